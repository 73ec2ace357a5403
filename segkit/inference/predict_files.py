"""Predict on image files into an output folder, resumably: what ``segkit predict`` runs.

Output folder::

    overlays/<name>.png   the image with masks, boxes and labels drawn
    masks/<name>.png      one instance id per pixel (0 background, 1..N in score order)
    predictions.json      COCO: images, categories (the checkpoint's classes, ids 1..N), annotations
                          with RLE masks, xywh boxes, areas and scores
    labelstudio.json      tasks to import into Label Studio as pre-annotations
    records/<name>.json   one per finished image; a re-run skips images whose record is there

Under ``torchrun`` each rank predicts its share of the images not yet done (see :mod:`segkit.inference.sharding`)
into the same folders, and rank 0 writes the two json files from all the records once every rank is
done: the same files, in the same order, as one process writes. A record is per image, not per rank,
so a run stopped half way resumes with any number of ranks, or with one process.

``<name>`` is the image's file stem; images with the same stem get as many parent folders as
needed to tell them apart (``a__img``, ``b__img``; ``img_jpg``, ``img_png`` within one folder).
A record counts only for the same image file, checkpoint file and score threshold; anything else
is predicted again. The two json files always describe every image of the current sources,
whether predicted now or by an earlier run.

Label Studio tasks name their image by ``--image-root-url`` + the image's path relative to the
folder given on the command line (or the fixed part of a glob, or just its file name). With
local-files storage rooted at ``/srv`` and images in ``/srv/photos``::

    segkit predict photos/ --image-root-url '/data/local-files/?d=photos/' ...  # -> ?d=photos/sub/a.jpg

Without it, tasks carry the image path as given.

A semantic checkpoint (``task: "semantic"``) writes the same files: ``masks/<name>.png`` holds the class
index of each pixel (0 background, ``i + 1`` for class ``i``), the overlay shows the class map, and
the json files have one region per class present (its whole area; score: its mean confidence),
which Label Studio gets as one brush region per class.
"""
from __future__ import annotations

import glob
import dataclasses
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from segkit.atomic import write_json
from segkit.evaluation.coco import image_entry, predictions_file
from segkit.data.images import IMAGE_EXTENSIONS, ImageError, image_files, load_image
from segkit.labelstudio.preannotations import DEFAULT_FROM_NAME, DEFAULT_TO_NAME, to_labelstudio
from segkit.inference.sharding import Ranks, shard
from segkit.inference.predictor import Predictor
from segkit.inference.tiles import Tiling
from segkit.inference.tta import TTA
from segkit.inference.visualize import mask_png, overlay, save_png
from segkit.models.checkpoint import load_checkpoint, model_version, task_of
from segkit.tasks import get_task

if TYPE_CHECKING:
    import torch


class SourceError(ValueError):
    """A source names nothing that exists; the message says which."""


@dataclass
class LabelStudioOptions:
    """How ``labelstudio.json`` names the labeling config's tags and the images (see the module docstring)."""

    from_name: str = DEFAULT_FROM_NAME  # the <PolygonLabels>/<BrushLabels> tag
    to_name: str = DEFAULT_TO_NAME  # the <Image> tag
    brush: bool = False  # lossless brush masks instead of editable polygons
    image_root_url: str | None = None


@dataclass
class FolderResult:
    """What :func:`predict_to_folder` did."""

    entries: list[dict[str, Any]]  # every image's entry (see segkit.evaluation.coco.image_entry), done now or before
    failed: list[tuple[Path, str]]  # (path, error) of images that could not be read
    skipped: int  # images already done by an earlier run
    score_threshold: float
    predicted: int = 0  # images this process predicted (its share under torchrun), read or not


def predict_to_folder(checkpoint: Path, images: list[tuple[Path, str]], out: Path,
                      score_threshold: float | None = None, batch_size: int = 4, max_detections: int | None = 100,
                      labelstudio: LabelStudioOptions | None = None, ranks: Ranks | None = None,
                      device: str | torch.device | None = None, tiling: Tiling | None = None,
                      tta: TTA | None = None) -> FolderResult:
    """Predict ``(path, reference)`` images (from :func:`find_images`) into ``out``.

    Images already done there for the same image, checkpoint and threshold are skipped; the json
    files are rewritten for all. Raises CheckpointError for a checkpoint that cannot be used.

    Under torchrun (``ranks`` of a joined process group) every rank calls this with the same images:
    each predicts its :func:`segkit.inference.sharding.shard` of the images not yet done, writing their records,
    and rank 0 alone then writes the json files from all records, as one process would have. The
    other ranks' results have no ``entries``.
    """
    ranks = ranks or Ranks()
    ckpt = load_checkpoint(checkpoint)
    labelstudio = labelstudio or LabelStudioOptions()
    if get_task(task_of(ckpt)).region == "brush":  # a semantic model's class area is one region, often in pieces
        labelstudio = dataclasses.replace(labelstudio, brush=True)
    threshold = ckpt.get("score_threshold", 0.5) if score_threshold is None else score_threshold
    run_key = {"checkpoint": file_identity(Path(checkpoint)), "score_threshold": threshold,  # made otherwise: redone
               **({"tiling": dataclasses.asdict(tiling)} if tiling else {}),
               **({"tta": dataclasses.asdict(tta)} if tta else {})}
    run_key = json.loads(json.dumps(run_key))  # as a record holds it (tuples are lists there)
    names = unique_names([path for path, _ in images])
    for sub in ("overlays", "masks", "records"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    # Rank 0 alone reads the records and tells the others what is left: all cut the same list, even where
    # machines see a shared folder with different delays, and 100k records are read once, not once per rank.
    left = ranks.from_rank0(lambda: [i for i, ((path, _), name) in enumerate(zip(images, names))
                                     if load_record(out, name, path, run_key) is None])
    todo = [(images[i][0], names[i]) for i in left]
    mine = shard(todo, ranks)
    failed = []
    if mine:  # building the model takes seconds; a finished folder only needs its json rewritten
        predictor = Predictor.from_loaded_checkpoint(ckpt, checkpoint, device, max_detections=max_detections)
        predictor.tile(tiling).augment(tta)
        failed = predict_images(predictor, mine, out, threshold, run_key, max(1, batch_size),
                                progress=ranks.rank == 0)
    ranks.barrier()  # every share's records are written before rank 0 reads them
    entries = []
    if ranks.rank == 0:
        entries = finished_entries(out, images, names, run_key)
        write_outputs(out, entries, list(ckpt["classes"]), model_version(checkpoint),
                      labelstudio)
    return FolderResult(entries, failed, len(images) - len(todo), threshold, len(mine))


def write_outputs(out: Path, entries: list[dict[str, Any]], classes: list[str], version: str,
                  ls: LabelStudioOptions) -> None:
    """predictions.json and labelstudio.json of ``entries``, written atomically."""
    write_json(out / "predictions.json", predictions_file(entries, classes))
    write_json(out / "labelstudio.json", to_labelstudio(entries, version, ls.from_name, ls.to_name, ls.brush,
                                                        ls.image_root_url))


def finished_entries(out: Path, images: list[tuple[Path, str]], names: list[str],
                      run_key: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of every image of this run that has a record, in source order."""
    entries = []
    for (path, ref), name in zip(images, names):
        record = load_record(out, name, path, run_key)
        if record is not None:
            # Paths as given now, not as in the run that made the record (it may have run elsewhere).
            entries.append({**record["entry"], "file_name": str(path), "image_ref": ref})
    return entries


def predict_images(predictor: Predictor, todo: list[tuple[Path, str]], out: Path, threshold: float,
                   run_key: dict[str, Any], batch_size: int, progress: bool = True) -> list[tuple[Path, str]]:
    """Predict ``(path, name)`` pairs in batches, writing overlay, mask and record per image.

    The record is written last, so an interrupted run redoes exactly the unfinished images.
    Returns ``(path, error)`` for images that could not be read.
    """
    failed: list[tuple[Path, str]] = []
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    # Decoding the next batch's JPEGs in a thread overlaps it with the forward pass.
    with ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(total=len(todo), desc="predict", unit="img", dynamic_ncols=True, disable=not progress) as bar:
        pending = pool.submit(_load_batch, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            loaded = pending.result()
            pending = pool.submit(_load_batch, batches[i + 1]) if i + 1 < len(batches) else None
            ok = [(path, name, image) for (path, name), image in zip(batch, loaded) if not isinstance(image, str)]
            failed += [(path, image) for (path, _), image in zip(batch, loaded) if isinstance(image, str)]
            predictions = predictor.predict_batch([image for _, _, image in ok], threshold) if ok else []
            for (path, name, image), prediction in zip(ok, predictions):
                save_png(overlay(image, prediction), out / "overlays" / f"{name}.png")
                save_png(mask_png(prediction), out / "masks" / f"{name}.png")
                # a semantic model's class map becomes one region per class present
                entry = image_entry(str(path), image.width, image.height, prediction.as_instances())
                write_json(out / "records" / f"{name}.json",
                           {"source": str(path.resolve()), "run": run_key, "entry": entry})
            bar.update(len(batch))
    return failed


def _load_batch(batch: list[tuple[Path, str]]) -> list:
    """Images of a batch; an unreadable one becomes its error message instead of stopping the run."""
    loaded = []
    for path, _ in batch:
        try:
            loaded.append(load_image(path))
        except ImageError as e:
            loaded.append(str(e))
    return loaded


def find_images(sources: list[str], exclude: Path | None = None) -> list[tuple[Path, str]]:
    """``(path, reference)`` for every image the sources name, each file once, in a stable order.

    The reference is the path relative to the folder given (or to the fixed part of a glob), or
    the file name for a file given by name; it is what ``--image-root-url`` is prefixed to.
    Folders and globs keep only files with image extensions; files named one by one are taken as
    they are. Anything under ``exclude`` (the output folder) is skipped.
    """
    found: list[tuple[Path, str]] = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            found.append((path, path.name))
        elif path.is_dir():
            found += [(f, f.relative_to(path).as_posix()) for f in image_files(path)]
        elif glob.has_magic(source):
            base = _glob_base(source)
            for match in sorted(glob.glob(source, recursive=True)):
                m = Path(match)
                if m.is_dir():
                    found += [(f, Path(os.path.relpath(f, base)).as_posix()) for f in image_files(m)]
                elif m.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append((m, Path(os.path.relpath(m, base)).as_posix()))
        else:
            raise SourceError(f"{source}: no such file or folder, and no glob pattern")
    skip = exclude.resolve() if exclude is not None else None
    seen, unique = set(), []
    for path, ref in found:
        key = path.resolve()
        if key in seen or (skip is not None and key.is_relative_to(skip)):
            continue
        seen.add(key)
        unique.append((path, ref))
    return unique


def _glob_base(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: ``data/*/img.jpg`` -> ``data``."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def unique_names(paths: list[Path]) -> list[str]:
    """Output names: the file stem, with parent folders prepended (``a__img``) only where stems clash.

    ``img.jpg`` and ``img.png`` in one folder become ``img_jpg`` and ``img_png``.
    """
    parents = [p.resolve().parent.parts for p in paths]
    in_folder = Counter((parent, p.stem) for parent, p in zip(parents, paths))
    stems = [f"{p.stem}_{p.suffix.lstrip('.')}" if in_folder[(parent, p.stem)] > 1 else p.stem
             for parent, p in zip(parents, paths)]
    depth = [0] * len(paths)
    while True:  # ends: clashing names now come from different folders, which differ at some depth
        names = ["__".join([*parents[i][len(parents[i]) - depth[i]:], stems[i]]) for i in range(len(paths))]
        counts = Counter(names)
        clashing = [i for i, n in enumerate(names) if counts[n] > 1 and depth[i] < len(parents[i])]
        if not clashing:
            return names
        for i in clashing:
            depth[i] += 1


def file_identity(path: Path) -> str:
    # Path, size and modification time: a retrained best.pt at the same path is a different model.
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def load_record(out: Path, name: str, path: Path, run_key: dict[str, Any]) -> dict | None:
    """The record of a finished image, or None when missing, unreadable or made from another image or model."""
    try:
        record = json.loads((out / "records" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("source") != str(path.resolve()) or record.get("run") != run_key:
        return None
    return record
