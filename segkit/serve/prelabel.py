"""Pre-label a Label Studio project: one prediction per task, scored so that the least-sure come first.

``segkit prelabel <project URL> --checkpoint CKPT`` and the ML backend (``--prelabel-after-training``) post
predictions through Label Studio's API with a ``model_version`` and a task ``score``. Sorting the Data
Manager by "Prediction score", ascending, then puts the tasks the model is least sure of first: labelling
those teaches it most (uncertainty sampling), and they are the pre-annotations most in need of a human.

The score (:func:`task_score`): the model looks again with half the display threshold, and the image is as
sure as its least-sure candidate. An image whose objects all score high is sure; one with a near miss
(a candidate under the threshold but above half of it) is as unsure as that candidate; one where the model
sees nothing at all, or only weak candidates, scores 0 and comes first: either it is empty, or it holds
objects the model cannot yet see, and a human should say which.

Re-runs are idempotent: a task that already holds a prediction of this ``model_version`` is skipped
(``only_missing``), so an interrupted run resumes where it stopped without duplicates; Label Studio itself
is the record of what is done.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from segkit.evaluation.coco import image_entry
from segkit.labelstudio.client import Client, LabelStudioError, redact
from segkit.labelstudio.config import choose_target, match_labels
from segkit.labelstudio.preannotations import prediction_result
from segkit.labelstudio.project import ImageCache, TaskImage, cache_folder, integer_id
from segkit.tasks import get_task

log = logging.getLogger("segkit.serve.prelabel")

PAGE_SIZE = 100
MAX_TASKS = 1_000_000  # tasks read from one project at most: the pages of a server that never ends


def task_score(scores: Iterable[float], threshold: float) -> float:
    """How sure the model is of one image, in [0, 1]; sort ascending to label the least sure first.

    ``scores`` are the image's candidates down to ``threshold / 2`` (what :func:`labelling_prediction`
    looks at). The least-sure candidate decides; with none the score is 0: an image where the model sees
    nothing, or only weak candidates, is where it is least useful.
    """
    kept = [float(s) for s in scores if s >= threshold / 2]
    return min(kept) if kept else 0.0


def labelling_prediction(predictor, image, threshold: float | None = None):
    """(what to pre-annotate: the instances at ``threshold`` or above, the image's :func:`task_score`).

    A semantic model's class regions (one per class present, scored by mean confidence) are all shown.
    """
    threshold = predictor.score_threshold if threshold is None else threshold
    candidates = predictor(image, score_threshold=max(threshold / 2, predictor.score_floor))
    return candidates.at_least(threshold).as_instances(), task_score(candidates.scores, threshold)


@dataclass
class PrelabelResult:
    """What a run did: tasks posted, skipped (already holding this version's prediction) and failed."""

    model_version: str
    posted: list[tuple[int, float]] = field(default_factory=list)  # (task id, score)
    skipped: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (task id, why)


def prelabel_project(client: Client, project: int, predictor, version: str, only_missing: bool = True,
                     threshold: float | None = None, cache_dir: str | Path | None = None,
                     max_pixels: int | None = None, progress: bool = True, lock=None,
                     shard: tuple[int, int] = (0, 1)) -> PrelabelResult:
    """Predict every task of ``project`` (or those without a ``version`` prediction) and post each at once.

    Regions use the labeling config's own mask tag and label names (as the ML backend's do), and the project's
    ``model_version`` becomes ``version``, which the Data Manager's prediction score follows. One task's
    failure (its image, its decoding) is recorded and the others go on; a failed post of a prediction
    raises, since the server itself is then in question. ``lock`` (the ML backend's) is held around each
    forward pass, so prelabelling shares the model with requests instead of fighting them for the cores.

    ``shard`` = (rank, world size) under torchrun: this process takes every world-th task of the project's
    list from its rank on. The shares are cut from the whole list, not from what is left, so ranks that read
    Label Studio at different moments still split it the same way; rank 0 sets the project's version.
    """
    settings = client.get_json(f"/api/projects/{project}")
    config = settings.get("label_config") or ""
    target = choose_target(config, get_task(predictor.task).region)
    labels = match_labels(predictor.classes, target)
    if not labels:
        raise LabelStudioError(f"project {project}: none of the model's classes {predictor.classes} is a label of "
                               f"the config's <{target.tag}> {target.from_name!r}")
    rank, world = shard
    tasks = list(project_tasks(client, project, settings.get("task_number")))[rank::world]
    done = tasks_with_version(client, project, version) if only_missing else set()
    result = PrelabelResult(version, skipped=sum(t["id"] in done for t in tasks))
    cache = ImageCache(cache_folder(client.server, project, cache_dir))
    max_side = max_image_side(predictor)
    try:
        for task in tqdm([t for t in tasks if t["id"] not in done], desc="prelabel", unit="task",
                         disable=not progress):
            try:
                answer = _predict_task(client, cache, task, predictor, threshold, max_side, max_pixels,
                                       lock or contextlib.nullcontext())
            except (LabelStudioError, OSError, ValueError) as e:
                log.warning("task %s: no prediction: %s", task["id"], e)
                result.failed.append((task["id"], str(e)))
                continue
            entry, original_size, score = answer
            body = prediction_result(entry, version, target.from_name, target.to_name, target.brush, labels,
                                     original_size=original_size, score=score)
            client.request("POST", "/api/predictions", json={"task": task["id"], **body})
            result.posted.append((task["id"], score))
    finally:
        cache.save()
    if rank == 0 and settings.get("model_version") != version:
        # The Data Manager's "Prediction score" (and pre-labelling on opening a task) counts only the
        # predictions of the project's model version: without this, the new scores would not order anything
        client.request("PATCH", f"/api/projects/{project}", json={"model_version": version})
    return result


def _predict_task(client: Client, cache: ImageCache, task: dict, predictor, threshold: float | None,
                  max_side: int | None, max_pixels: int | None, lock) -> tuple[dict, tuple[int, int], float]:
    """(the task's image_entry, its image's original size, its task_score); a cached copy that does not
    decode is fetched again, as the ML backend does."""
    found = TaskImage.download(client, cache, task)
    image, original_size = found.load(client, cache, max_side, max_pixels)
    with lock:
        prediction, score = labelling_prediction(predictor, image, threshold)
    return image_entry(found.ref, image.width, image.height, prediction), original_size, score


def project_tasks(client: Client, project: int, count: int | None = None,
                  max_tasks: int = MAX_TASKS) -> Iterator[dict]:
    """Every task of ``project`` (id and data), page by page, in Label Studio's order, each once.

    Stops after the last page, at the project's ``count`` of tasks (its ``task_number``), or raises
    LabelStudioError naming the page when the pages do not end: one that holds only tasks already read,
    or more than ``max_tasks`` tasks. A server that keeps answering full pages must not keep a run going.
    """
    seen: set[int] = set()
    limit = min(count, max_tasks) if isinstance(count, int) and count >= 0 else max_tasks
    page = 1
    while len(seen) < limit:
        try:
            body = client.get_json("/api/tasks", project=project, page=page, page_size=PAGE_SIZE, fields="all")
        except LabelStudioError as e:
            if page > 1 and "404" in str(e):  # past the last page
                return
            raise
        tasks = body.get("tasks", []) if isinstance(body, dict) else body
        tasks = tasks if isinstance(tasks, list) else []
        new = [t for t in tasks if isinstance(t, dict) and integer_id(t.get("id")) is not None and t["id"] not in seen]
        if tasks and not new:
            raise LabelStudioError(f"{client.server}/api/tasks?project={project}&page={page}: a page of tasks "
                                   f"already read; the task list does not end (stopped after {len(seen)} tasks)")
        for task in new[:limit - len(seen)]:
            seen.add(task["id"])
            yield {"id": task["id"], "data": task.get("data") if isinstance(task.get("data"), dict) else {}}
        total = body.get("total") if isinstance(body, dict) else None
        if len(tasks) < PAGE_SIZE or (isinstance(total, int) and page * PAGE_SIZE >= total):
            return
        page += 1
    if limit == max_tasks and (count is None or count > max_tasks):
        raise LabelStudioError(f"{client.server} project {project}: more than {max_tasks} tasks; stopped there "
                               f"(the pages did not end, or the project is larger than segkit reads at once)")


def tasks_with_version(client: Client, project: int, version: str) -> set[int]:
    """Ids of the tasks of ``project`` that hold a prediction of ``version``."""
    predictions = client.get_json("/api/predictions", project=project)
    items = predictions.get("results", []) if isinstance(predictions, dict) else predictions
    return {p["task"] for p in items if p.get("model_version") == version}


def least_sure(result: PrelabelResult, n: int = 5) -> list[tuple[int, float]]:
    """The ``n`` posted tasks the model is least sure of, lowest score first."""
    return sorted(result.posted, key=lambda p: p[1])[:n]


def max_image_side(predictor) -> int | None:
    """The longest side the model looks at (torchvision's ``max_size``; a semantic model's ``img_size`` with
    torchvision's 800:1333 allowance): decoding more only costs memory. None for a predictor that slices
    images into tiles (:meth:`~segkit.inference.predictor.Predictor.tile`): it looks at every pixel."""
    if getattr(predictor, "tiling", None) is not None:
        return None
    transform = getattr(predictor.model, "transform", None)
    if transform is not None and hasattr(transform, "max_size"):
        return int(transform.max_size)
    img_size = getattr(predictor.model, "img_size", None)
    return round(img_size * 1333 / 800) if isinstance(img_size, int) else None


def sort_hint(server: str, project: int) -> str:
    """How to put the least-sure tasks first in Label Studio's Data Manager."""
    return (f"In Label Studio ({redact(server)}/projects/{project}/data), order the tasks by 'Prediction score' "
            f"ascending (click the column header, or Order -> Prediction score): the least-sure come first. "
            f"Switch on the column in the Data Manager's column menu if it is hidden.")

