"""The effort segkit saves a labeller, measured on a labelled dataset held out from training (issue #20, part 3).

A simulated annotator labels every object of the held-out images, each path counted in actions (a click,
a polygon vertex, an accept, a delete):

- **polygons by hand**: each object drawn as a polygon, its vertices those of ``cv2.approxPolyDP`` at the
  coarsest tolerance whose filled polygon still reaches IoU >= 0.85 with the object's mask;
- **pre-annotation only**: a shown pre-annotation (``segkit.serve.prelabel.labelling_prediction``) of the right class
  matching an object at IoU >= 0.85 is accepted (1 action, one object per pre-annotation); the other objects
  are drawn by hand; every shown pre-annotation that matched nothing is deleted (1 action);
- **prompts only**: a box prompt (2 clicks) around each object, the model's answer accepted at IoU >= 0.85;
  else corrective clicks, one at a time, at the point farthest inside the larger error (RITM's clicker,
  ``segkit.engine.refiner.next_click``): positive in a missed area, negative in a false one, up to ``--clicks``,
  answered by the model's refinement head when it has one; else the polygon by hand, the failed clicks counted too;
- **pre-annotation + prompts**: accept what matches, prompts for the rest, deletes as above.

With a refinement head a corrective step is ``PromptEngine.refine`` with the box and all the object's clicks so
far. Without one it asks ``PromptEngine.clicks``; the object's mask is then the union of the box answer (dropped
once a negative click falls in it) and the click answers, cut to the box.
NoC@85 / NoC@90 (the interactive-segmentation literature's number of clicks, the box counting 2) are over
every object, an object that never reaches the IoU counted at the cap (2 + ``--clicks``).

Ordering: a seed model scores the unlabelled pool (``segkit.serve.prelabel.task_score``, low = least sure); ``k``
images picked least-sure-first and ``k`` at random (several seeds) are each added to the seed images, a fresh
model is trained from random init on each selection, and its mask AP on the held-out split is reported.

Data: data/sample's val split (20 images) is held out; the first ``--seed-images`` of its train split train
the pre-annotation model; the rest of the train split is the pool the ordering picks from.

    python -m bench.labelling [--seed-images 8] [--epochs 10] [--img-size 128] [--k 6] [--seeds 0 1 2] \
        [--report docs/benchmarks/labelling.md]
    python -m bench.labelling --checkpoint CKPT [--split val test] [--report ...]   # a trained model, no training

The defaults took 35 minutes on 2 cores shared with other jobs (each training about 7); ``--k 4 --seeds 0 1``
and fewer ``--epochs`` fit about 15.

Random-init weights (none can be downloaded here), a few epochs at 128 px on a CPU: the models are weak,
so the absolute numbers are small; the script prints so.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.clicks import held_out_records  # noqa: E402 - after the path it needs
from bench.ordering import write_subset  # noqa: E402
from bench.report import write_report  # noqa: E402
from segkit.inference.predictor import Predictor  # noqa: E402
from segkit.serve.prelabel import labelling_prediction  # noqa: E402
from segkit.serve.prompts import PromptEngine  # noqa: E402
from segkit.data.readers import load_dataset  # noqa: E402
from segkit.data.records import ImageRecord  # noqa: E402
from segkit.models.checkpoint import load_checkpoint  # noqa: E402
from segkit.engine.refiner import next_click  # noqa: E402
from segkit.engine.trainer import TrainConfig, train  # noqa: E402

log = logging.getLogger("bench.labelling")
SAMPLE = REPO / "data" / "sample"
ACCEPT_IOU = 0.85
NOC_IOUS = (0.85, 0.90)
METHOD = """\
The effort segkit saves a labeller, on labelled images held out from training: the sample's val split is held
out, the first `--seed-images` of its train split train the pre-annotation model (random init, a few epochs at
a small size on a CPU: a weak model, so the absolute numbers are small), and the rest of the train split is
the pool that the ordering picks from.

**Actions.** A simulated annotator labels every object of the held-out images along four paths, each counted
in actions (a click, a polygon vertex, an accept, a delete). *Polygons by hand*: each object drawn as a
polygon, its vertices those of `cv2.approxPolyDP` at the coarsest tolerance whose filled polygon still reaches
IoU >= 0.85 with the object. *Pre-annotation only*: a shown pre-annotation of the right class matching an
object at IoU >= 0.85 is accepted (1 action), the other objects are drawn by hand, and every shown
pre-annotation that matched nothing is deleted (1 action). *Prompts only*: a box prompt (2 clicks) around each
object, its answer accepted at IoU >= 0.85; else corrective clicks one at a time, at the point farthest inside the
larger error (positive in a missed area, negative in a false one), up to `--clicks`; else the polygon
by hand, the failed clicks counted too. *Pre-annotation + prompts*: accept what matches, prompts for the rest,
deletes as above. NoC@85 / NoC@90 (the interactive-segmentation literature's number of clicks, the box counting
2) are over every object, one that never reaches the IoU counted at the cap.

**Ordering.** The seed model scores the pool (low = least sure); `k` images picked least-sure-first and `k`
picked at random (several seeds) are each added to the seed images, a fresh model is trained from random init
on each selection, and its mask AP on the held-out split is reported. Differences as small as the spread
between the random seeds are not findings."""

CHECKPOINT_METHOD = """\
The effort segkit saves a labeller, on a trained model's held-out images (`--checkpoint`: its val and test
splits; a val split chose its best epoch, the test split did not). A simulated annotator labels every object
along four paths, each counted in actions (a click, a polygon vertex, an accept, a delete). *Polygons by hand*:
each object drawn as a polygon, its vertices those of `cv2.approxPolyDP` at the coarsest tolerance whose filled
polygon still reaches IoU >= 0.85 with the object. *Pre-annotation only*: a shown pre-annotation of the right
class matching an object at IoU >= 0.85 is accepted (1 action), the other objects are drawn by hand, and every
shown pre-annotation that matched nothing is deleted (1 action). *Prompts only*: a box prompt (2 clicks) around
each object, its answer accepted at IoU >= 0.85; else corrective clicks one at a time, at the point farthest
inside the larger error (RITM's clicker), answered by the model's refinement head when it has one, up to
`--clicks`; else the polygon by hand, the failed clicks counted too. *Pre-annotation + prompts*: accept what
matches, prompts for the rest, deletes as above. NoC@85 / NoC@90 (the box counting 2) are over every object,
one that never reaches the IoU counted at the cap. The order of images is `bench/ordering.py`'s page."""


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


# --- the annotator's actions ------------------------------------------------------------------------------


def polygon_vertices(mask: np.ndarray, target: float = ACCEPT_IOU) -> int:
    """Vertices of the hand-drawn polygon(s): ``cv2.approxPolyDP`` at the largest tolerance whose filled
    result keeps IoU >= ``target`` with ``mask`` (each outer contour at least 3 vertices)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return 0
    side = max(mask.shape)
    for eps in np.geomspace(side / 4, 0.25, 40):  # coarse to fine: the first that keeps the IoU wins
        polys = [cv2.approxPolyDP(c, float(eps), True) for c in contours]
        filled = np.zeros(mask.shape, np.uint8)
        cv2.fillPoly(filled, polys, 1)
        if iou(filled.astype(bool), mask) >= target:
            break
    return sum(max(len(p), 3) for p in polys)


def prompt_trajectory(engine: PromptEngine, key: str, image: np.ndarray, gt: np.ndarray, label: int,
                      limit: int) -> list[tuple[int, float]]:
    """(clicks so far, IoU) after the box prompt and after each corrective click, until IoU >= 0.90 or
    ``limit`` corrections."""
    ys, xs = np.nonzero(gt)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    keep = np.zeros_like(gt)
    keep[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = True
    box_mask = engine.box(key, image, box, label).mask
    mask, clicks = box_mask, []
    steps = [(2, iou(mask, gt))]
    for _ in range(limit):
        if steps[-1][1] >= max(NOC_IOUS):
            break
        click = next_click(mask, gt)
        if click is None:
            break
        (x, y), positive = click
        clicks.append((x, y, positive))
        if engine.refiner is not None:  # the head corrects the box's object click by click
            mask = engine.refine(key, image, clicks, box=box, label=label).mask
        else:
            mask = picked(engine, key, image, box_mask, clicks, label) & keep
        steps.append((steps[-1][0] + 1, iou(mask, gt)))
    return steps


def picked(engine: PromptEngine, key: str, image: np.ndarray, box_mask: np.ndarray,
           clicks: list[tuple[float, float, bool]], label: int) -> np.ndarray:
    """Without a refinement head: the box's answer (dropped once a negative click falls in it) and the
    detections the positive clicks pick."""
    positives = [(x, y) for x, y, p in clicks if p]
    negatives = [(x, y) for x, y, p in clicks if not p]
    answers = engine.clicks(key, image, positives, negatives, [label] * len(positives)) if positives else []
    box_kept = not any(box_mask[int(y), int(x)] for x, y in negatives)
    mask = np.zeros_like(box_mask)
    for m in ([box_mask] if box_kept else []) + [a.mask for a in answers]:
        mask |= m
    return mask


def clicks_to(steps: list[tuple[int, float]], target: float) -> int | None:
    """Clicks until the IoU first reaches ``target``; None when it never does."""
    return next((n for n, v in steps if v >= target), None)


def matched_objects(shown, gts: list[np.ndarray], labels: list[int]) -> tuple[set[int], int]:
    """(objects whose pre-annotation is accepted, shown pre-annotations matching none): greedy one-to-one
    by IoU, same class, IoU >= 0.85."""
    masks = shown.masks
    pairs = sorted(((iou(masks[j], gt), i, j) for i, gt in enumerate(gts) for j in range(len(shown))
                    if int(shown.labels[j]) == labels[i]), reverse=True)
    objects, used = set(), set()
    for value, i, j in pairs:
        if value >= ACCEPT_IOU and i not in objects and j not in used:
            objects.add(i)
            used.add(j)
    return objects, len(shown) - len(used)


# --- the annotator on the held-out split ----------------------------------------------------------------


@dataclass
class Tally:
    """Actions per path over every object, and the prompt path's trajectories."""

    objects: int = 0
    actions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    accepted: int = 0
    deletes: int = 0
    trajectories: list[list[tuple[int, float]]] = field(default_factory=list)


PATHS = ("polygons by hand", "pre-annotation only", "prompts only", "pre-annotation + prompts")


def annotate(predictor: Predictor, records: list[ImageRecord], limit: int) -> Tally:
    """Label every object of ``records`` along each path, counting actions (see the module's docstring)."""
    engine, tally = PromptEngine(predictor, version="bench"), Tally()
    for n, record in enumerate(records, start=1):
        log.info("annotating %s (%d)", record.path.name, n)
        image = np.asarray(Image.open(record.path).convert("RGB"))
        gts = [inst.mask(record.height, record.width).astype(bool) for inst in record.instances]
        labels = [predictor.classes.index(inst.label) + 1 for inst in record.instances]
        keep = [i for i, gt in enumerate(gts) if gt.any()]
        gts, labels = [gts[i] for i in keep], [labels[i] for i in keep]
        shown, _ = labelling_prediction(predictor, image)
        accepted, extra = matched_objects(shown, gts, labels)
        tally.objects, tally.accepted, tally.deletes = tally.objects + len(gts), tally.accepted + len(accepted), \
            tally.deletes + extra
        tally.actions["pre-annotation only"] += extra
        tally.actions["pre-annotation + prompts"] += extra
        for i, (gt, label) in enumerate(zip(gts, labels)):
            by_hand = polygon_vertices(gt)
            steps = prompt_trajectory(engine, str(record.path), image, gt, label, limit)
            tally.trajectories.append(steps)
            reached = clicks_to(steps, ACCEPT_IOU)
            prompted = reached if reached is not None else 2 + limit + by_hand
            tally.actions["polygons by hand"] += by_hand
            tally.actions["prompts only"] += prompted
            tally.actions["pre-annotation only"] += 1 if i in accepted else by_hand
            tally.actions["pre-annotation + prompts"] += 1 if i in accepted else prompted
    return tally


def annotation_report(tally: Tally, limit: int) -> list[str]:
    """The annotator's table (actions per object along each path) and the prompt path's NoC (markdown lines)."""
    n = max(tally.objects, 1)
    lines = [f"{tally.objects} objects; pre-annotations accepted: {tally.accepted}, deleted: {tally.deletes}.", "",
             "| path | actions/object | vs by hand |", "|---|---|---|"]
    by_hand = tally.actions["polygons by hand"] / n
    for path in PATHS:
        per = tally.actions[path] / n
        lines.append(f"| {path} | {per:.2f} | {per / by_hand if by_hand else float('nan'):.2f} |")
    lines.append("")
    cap = 2 + limit
    if tally.trajectories:
        after_box = statistics.mean(t[0][1] for t in tally.trajectories)
        best = statistics.mean(max(v for _, v in t) for t in tally.trajectories)
        lines.append(f"- prompt answers' IoU with the object: mean {after_box:.2f} after the box, mean best "
                     f"{best:.2f} within {limit} corrective clicks")
    for target in NOC_IOUS:
        reached = [clicks_to(s, target) for s in tally.trajectories]
        noc = statistics.mean(r if r is not None else cap for r in reached) if reached else float("nan")
        hits = sum(r is not None for r in reached)
        box = sum(r == 2 for r in reached)
        lines.append(f"- NoC@{round(target * 100)} {noc:.2f} (cap {cap}); reached by {hits} of {len(reached)} "
                     f"objects, {box} by the box alone")
    return lines


# --- ordering: least-sure first against random ----------------------------------------------------------


def train_on(names: list[str], folder: Path, args) -> dict:
    """A fresh random-init model trained on ``names`` of the sample's train split, evaluated on its val split."""
    log.info("training on %d images -> %s", len(names), folder.name)
    for split, chosen in (("train", names), ("val", image_names(SAMPLE / "val"))):
        coco = json.loads((SAMPLE / split / "result.json").read_text())
        write_subset(coco, SAMPLE / split, chosen, folder / "data" / split)
    cfg = TrainConfig(data=str(folder / "data"), weights="none", img_size=args.img_size, batch_size=2, workers=0,
                      aug="none", lr=0.02, warmup_iters=5, schedule="step", epochs=args.epochs,
                      eval_every=args.epochs, roi_batch_size=128, out=str(folder / "run"), progress=False,
                      seed=0, score_threshold=args.threshold)
    return train(cfg)


def image_names(split: Path) -> list[str]:
    """File names of ``split``'s images that hold objects, sorted."""
    coco = json.loads((split / "result.json").read_text())
    annotated = {a["image_id"] for a in coco["annotations"]}
    return sorted(im["file_name"] for im in coco["images"] if im["id"] in annotated)


def least_sure_first(predictor: Predictor, names: list[str]) -> tuple[list[str], list[float]]:
    """``names`` ordered by the seed model's task score, lowest first (ties in name order)."""
    log.info("scoring %d pool images", len(names))
    scores = [labelling_prediction(predictor, np.asarray(Image.open(SAMPLE / "train" / n).convert("RGB")))[1]
              for n in names]
    order = sorted(range(len(names)), key=lambda i: scores[i])
    return [names[i] for i in order], [scores[i] for i in order]


def ordering(predictor: Predictor, seed_names: list[str], pool: list[str], folder: Path, args) -> list[str]:
    """Mask AP on the held-out split after labelling ``k`` more images, least-sure first and at random."""
    ranked, scores = least_sure_first(predictor, pool)
    picks = {"least-sure first": ranked[:args.k]}
    for seed in args.seeds:
        picks[f"random (seed {seed})"] = random.Random(seed).sample(pool, args.k)
    rows = {}
    for name, chosen in picks.items():
        metrics = train_on(seed_names + chosen, folder / name.replace(" ", "_"), args)["best_metrics"]
        rows[name] = (metrics.get("val_segm_map", 0.0), metrics.get("val_segm_map50", 0.0))
    lines = [f"Pool {len(pool)} images, task scores of the least-sure {args.k}: "
             f"{', '.join(f'{s:.2f}' for s in scores[:args.k])} ({sum(s == 0 for s in scores)} of the pool score "
             f"0).", "", "| selection (seed images + k) | mask AP | mask AP50 |", "|---|---|---|"]
    lines += [f"| {name} | {ap:.3f} | {ap50:.3f} |" for name, (ap, ap50) in rows.items()]
    randoms = [rows[n] for n in rows if n.startswith("random")]
    lines.append(f"| random, mean of {len(randoms)} | {statistics.mean(r[0] for r in randoms):.3f} | "
                 f"{statistics.mean(r[1] for r in randoms):.3f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a trained model to measure on its held-out --split (no training, no ordering)")
    p.add_argument("--data", help="with --checkpoint: its dataset (default: the one its config names)")
    p.add_argument("--split", nargs="+", default=["val", "test"], help="with --checkpoint: its held-out splits")
    p.add_argument("--seed-images", type=int, default=8, help="train images the pre-annotation model learns from")
    p.add_argument("--epochs", type=int, default=10, help="epochs of every training")
    p.add_argument("--img-size", type=int, default=128, help="image size inside the models")
    p.add_argument("--threshold", type=float, default=0.5, help="score threshold of the shown pre-annotations")
    p.add_argument("--clicks", type=int, default=5, help="corrective clicks before drawing by hand")
    p.add_argument("--k", type=int, default=6, help="images labelled next, in the ordering comparison")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random selections to compare with")
    p.add_argument("--max-detections", type=int, default=20, help="detections per image (the sample: 1-8 objects)")
    p.add_argument("--skip-ordering", action="store_true", help="only the annotator simulation")
    p.add_argument("--report", default=None, help="also write the page (markdown) here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            lines = on_checkpoint(args)
        else:
            lines = on_sample(args, Path(tmp))
    print(f"\n({time.perf_counter() - start:.0f} s in all)")
    if args.report:
        method = CHECKPOINT_METHOD if args.checkpoint else METHOD
        write_report(args.report, "Labelling effort: pre-annotations, prompts and the order of images",
                     "bench/labelling.py", sys.argv[1:], f"{method}\n\n" + "\n".join(lines))


def on_checkpoint(args) -> list[str]:
    """The annotator on a trained model's held-out splits (markdown lines)."""
    ckpt = load_checkpoint(args.checkpoint)
    records = held_out_records(ckpt, args.data, args.split)
    predictor = Predictor.from_loaded_checkpoint(ckpt, args.checkpoint, "cpu", args.max_detections)
    metrics = ckpt.get("metrics") or {}
    prompts = "the refinement head corrects" if predictor.refiner is not None else "clicks pick detections"
    lines = [f"Model: `{ckpt['arch']}` at {ckpt['img_size']} px, val mask AP {metrics.get('val_segm_map', 0):.3f} "
             f"(epoch {ckpt.get('epoch')}); {prompts}. Held-out: {len(records)} images of the "
             f"{' and '.join(args.split)} split. Pre-annotations shown: score >= {args.threshold:g}, at most "
             f"{args.max_detections} per image.", "", "## Actions", "",
             *annotation_report(annotate(predictor, records, args.clicks), args.clicks)]
    print("\n".join(lines), flush=True)
    return lines


def on_sample(args, tmp: Path) -> list[str]:
    """A seed model trained on the sample, the annotator on its val split, then the ordering (markdown lines)."""
    names = image_names(SAMPLE / "train")
    seed_names, pool = names[:args.seed_images], names[args.seed_images:]
    summary = train_on(seed_names, tmp / "seed", args)
    predictor = Predictor.from_checkpoint(summary["best"], device="cpu", max_detections=args.max_detections)
    lines = [f"Seed model: {args.seed_images} train images, {args.epochs} epochs at {args.img_size} px, random "
             f"init; held-out mask AP {summary['best_metrics'].get('val_segm_map', 0):.3f}. Pre-annotations "
             f"shown: score >= {args.threshold:g}, at most {args.max_detections} per image.", "",
             "## Actions", "",
             *annotation_report(annotate(predictor, load_dataset(SAMPLE / "val").images, args.clicks), args.clicks)]
    print("\n".join(lines), flush=True)
    if not args.skip_ordering:
        section = ordering(predictor, seed_names, pool, tmp, args)
        print("\n".join(section))
        lines += ["", "## Ordering: least-sure first against random", "", *section]
    print(f"Random-init weights, {args.epochs} epochs at {args.img_size} px on a CPU: the models are weak, so the "
          f"absolute numbers are small, and differences this small are within the spread between random seeds.")
    return lines


if __name__ == "__main__":
    main()
