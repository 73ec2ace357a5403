"""``segkit evaluate``: how good a checkpoint is on a dataset, as numbers and as two plots.

Two thresholds, on purpose:

* COCO AP (boxes and masks) ranks *every* detection the model returns: everything above
  torchvision's internal ``box_score_thresh`` (0.05), at most 100 per image. AP integrates over
  all score cut-offs, so cutting at the display threshold first would only lower it.
* Semantic IoU and Dice, and the pixel confusion matrix, look at what a user sees: the masks
  scoring at least the checkpoint's ``score_threshold`` (or ``--score-threshold``).

Semantic metrics compare, per class, the union of predicted masks with the union of ground-truth
masks. Intersections and unions are summed over the whole split before dividing (one big image,
not a mean of per-image ratios), so images where a class is absent cannot produce 0/0.
``background`` is reported per class but left out of mIoU and mDice: it covers most pixels and
would make every model look good. A class with neither ground truth nor predictions has no IoU
(``null``) and is left out of the means.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from segkit.metrics import coco_evaluate, prediction_to_coco
from segkit.records import ImageRecord

if TYPE_CHECKING:
    from segkit.predict import Prediction, Predictor

BACKGROUND = "background"
SPLIT_CHOICES = ("val", "test", "train", "all")


class EvaluateError(ValueError):
    """The requested evaluation cannot be done; the message says what would work."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a segkit checkpoint (best.pt)")
    p.add_argument("--data", default=None, help="the dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--format", default=None, help="force the export format (default: detected)")
    p.add_argument("--images", default=None, help="folder holding the images, when not beside the export")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="val",
                   help="the checkpoint's saved split, else the dataset's own, else all images (default: val)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="masks at least this confident count for IoU/Dice and the confusion matrix "
                        "(default: the checkpoint's); COCO AP always uses all detections")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    p.add_argument("--max-detections", type=int, default=100,
                   help="most instances per image (COCO AP counts up to 100)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the metrics as JSON")
    p.add_argument("--out", default=None, metavar="DIR", help="write confusion_matrix.png and pr_curves.png here")


def run(args: argparse.Namespace) -> int:
    from segkit.checkpoint import CheckpointError
    from segkit.predict import Predictor
    from segkit.readers import DataError

    try:
        ckpt, records, which = _load(args)
    except (CheckpointError, DataError, EvaluateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = list(ckpt["classes"])
    predictor = Predictor.from_loaded_checkpoint(ckpt, args.checkpoint, max_detections=args.max_detections)
    threshold = predictor.score_threshold if args.score_threshold is None else args.score_threshold
    evaluator = SegmentationEvaluator(records, classes, threshold)
    predict_into(evaluator, predictor, max(1, args.batch_size))
    report = evaluator.evaluate()

    internal = getattr(getattr(predictor.model, "roi_heads", None), "score_thresh", None)
    print(f"{len(records)} images: {which}")
    print(f"COCO AP: all detections (the model's internal score threshold is {internal}); "
          f"IoU/Dice: masks with score >= {threshold:g}")
    print(format_table(report, classes))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plot_confusion_matrix(evaluator.pixels.confusion, [BACKGROUND, *classes], out / "confusion_matrix.png",
                              f"pixels, masks with score >= {threshold:g}")
        plot_pr_curves(evaluator.gt, evaluator.results, out / "pr_curves.png")
        print(f"wrote {out}/confusion_matrix.png, pr_curves.png")
    return 0


def _load(args: argparse.Namespace) -> tuple[dict, list[ImageRecord], str]:
    """(checkpoint, the images to evaluate with only the model's classes, where the choice came from)."""
    from segkit.checkpoint import load_checkpoint
    from segkit.readers import load_dataset

    ckpt = load_checkpoint(args.checkpoint)
    data = args.data or (ckpt.get("config") or {}).get("data")
    if not data:
        raise EvaluateError(f"{args.checkpoint} does not say which data it was trained on; pass --data")
    dataset = load_dataset(data, fmt=args.format, images_dir=args.images)
    records, which = select_split(dataset.images, ckpt.get("split"), args.split, Path(data))
    if not records:
        raise EvaluateError(f"no images to evaluate in {which}; try --split all")
    records, unknown = restrict_to_classes(records, ckpt["classes"])
    if unknown:
        print(f"note: ground truth of classes the model does not know is ignored: "
              f"{', '.join(f'{k} ({v})' for k, v in sorted(unknown.items()))}")
    return ckpt, records, which


def predict_into(evaluator: SegmentationEvaluator, predictor: Predictor, batch_size: int = 2) -> None:
    """Run ``predictor`` over the evaluator's images in batches and feed it every detection."""
    from segkit.images import load_image

    records = evaluator.records
    with tqdm(total=len(records), desc="evaluate", unit="img", dynamic_ncols=True) as bar:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            # Score threshold 0: every detection the model returns, for COCO AP (see the module docstring).
            predictions = predictor.predict_batch([load_image(r.path) for r in batch], score_threshold=0.0)
            for i, prediction in enumerate(predictions, start=start):
                evaluator.process(i, prediction)
            bar.update(len(batch))


# ---------------------------------------------------------------------------------------------
# Choosing the images


def select_split(images: list[ImageRecord], saved: dict[str, list] | None, split: str,
                 data: Path) -> tuple[list[ImageRecord], str]:
    """The images to evaluate and a phrase saying where the choice came from.

    ``saved`` is the checkpoint's ``split`` (image paths, absolute or relative to ``data``, or ids);
    when it is absent the records' own ``split`` field is used; when neither exists, all images.
    """
    if split == "all":
        return images, "all images"
    if saved:
        if split not in saved:
            raise EvaluateError(f"the checkpoint saved splits {', '.join(saved)}, not {split}; "
                                "use --split all or one of those")
        wanted = _path_keys(saved[split], data)
        chosen = [im for im in images if _record_keys(im, data) & wanted]
        if not chosen and saved[split]:
            raise EvaluateError(f"none of the {len(saved[split])} {split} images saved in the checkpoint are in "
                                f"{data}; pass the data it was trained on, or --split all")
        missing = len(saved[split]) - len(chosen)
        note = f" ({missing} of its images not found)" if missing else ""
        return chosen, f"the {split} split saved in the checkpoint{note}"
    if any(im.split for im in images):
        chosen = [im for im in images if (im.split or "train") == split]
        if not chosen:
            have = sorted({im.split or "train" for im in images})
            raise EvaluateError(f"the dataset has no {split} split (it has {', '.join(have)}); "
                                "use --split all or one of those")
        return chosen, f"the dataset's own {split} split"
    return images, "all images (neither the checkpoint nor the dataset has splits)"


def _path_keys(items: list, data: Path) -> set[str]:
    root = data if data.is_dir() else data.parent
    keys = set()
    for item in items:
        keys.add(str(item))
        p = Path(str(item))
        keys.add(str(p.resolve()))  # absolute, or relative to where training ran
        if not p.is_absolute():
            keys.add(str((root / p).resolve()))  # relative to the dataset
    return keys


def _record_keys(im: ImageRecord, data: Path) -> set[str]:
    root = data if data.is_dir() else data.parent
    path = Path(im.path).resolve()
    keys = {str(path), str(im.path)}
    if path.is_relative_to(root.resolve()):
        keys.add(path.relative_to(root.resolve()).as_posix())
    if im.image_id is not None:
        keys.add(str(im.image_id))
    return keys


def restrict_to_classes(records: list[ImageRecord], classes: Sequence[str]) -> tuple[list[ImageRecord], dict[str, int]]:
    """Records keeping only instances of ``classes``, and how many instances of each other class went."""
    known, dropped = set(classes), {}
    out = []
    for rec in records:
        for inst in rec.instances:
            if inst.label not in known:
                dropped[inst.label] = dropped.get(inst.label, 0) + 1
        out.append(replace(rec, instances=[i for i in rec.instances if i.label in known]))
    return out, dropped


# ---------------------------------------------------------------------------------------------
# Metrics


@dataclass
class PixelStats:
    """Pixel counts summed over a split; index 0 is background, 1..C the classes."""

    num_classes: int
    intersection: np.ndarray = field(init=False)
    union: np.ndarray = field(init=False)
    gt_area: np.ndarray = field(init=False)
    pred_area: np.ndarray = field(init=False)
    confusion: np.ndarray = field(init=False)  # rows: ground truth, columns: prediction

    def __post_init__(self):
        n = self.num_classes + 1
        self.intersection, self.union = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self.gt_area, self.pred_area = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self.confusion = np.zeros((n, n), np.int64)

    def add(self, gt_masks: list[tuple[int, np.ndarray]], pred_masks: list[tuple[int, np.ndarray]],
            shape: tuple[int, int]) -> None:
        """One image: ``(label, bool mask)`` pairs; ground truth in drawing order, predictions best first."""
        gt_union = [np.zeros(shape, bool) for _ in range(self.num_classes + 1)]
        pred_union = [np.zeros(shape, bool) for _ in range(self.num_classes + 1)]
        gt_map, pred_map = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        for label, mask in gt_masks:  # a later annotation is drawn on top, as in the annotation tools
            gt_union[label] |= mask
            gt_map[mask] = label
        for label, mask in reversed(pred_masks):  # the most confident instance ends up on top
            pred_union[label] |= mask
            pred_map[mask] = label
        gt_union[0] = ~np.logical_or.reduce(gt_union[1:], axis=0) if self.num_classes else np.ones(shape, bool)
        pred_union[0] = ~np.logical_or.reduce(pred_union[1:], axis=0) if self.num_classes else np.ones(shape, bool)
        for c, (g, p) in enumerate(zip(gt_union, pred_union)):
            self.intersection[c] += np.count_nonzero(g & p)
            self.union[c] += np.count_nonzero(g | p)
            self.gt_area[c] += np.count_nonzero(g)
            self.pred_area[c] += np.count_nonzero(p)
        n = self.num_classes + 1
        self.confusion += np.bincount((gt_map * n + pred_map).ravel(), minlength=n * n).reshape(n, n)


def semantic_metrics(pixels: PixelStats, classes: Sequence[str]) -> dict[str, Any]:
    """``{"per_class": {name: {"iou", "dice"}}, "mIoU", "mDice"}`` with background first; means over classes only."""
    per_class = {}
    for c, name in enumerate([BACKGROUND, *classes]):
        union, total = int(pixels.union[c]), int(pixels.gt_area[c] + pixels.pred_area[c])
        inter = int(pixels.intersection[c])
        per_class[name] = {"iou": inter / union if union else None, "dice": 2 * inter / total if total else None}
    ious = [per_class[n]["iou"] for n in classes if per_class[n]["iou"] is not None]
    dices = [per_class[n]["dice"] for n in classes if per_class[n]["dice"] is not None]
    return {"per_class": per_class, "mIoU": float(np.mean(ious)) if ious else None,
            "mDice": float(np.mean(dices)) if dices else None}


class SegmentationEvaluator:
    """COCO AP and semantic IoU/Dice, fed one image at a time so that masks never pile up in memory.

    ``process(i, prediction)`` takes the prediction for ``records[i]`` with *all* its detections;
    ``evaluate()`` returns ``{"bbox", "segm", "semantic"}`` (see the module docstring for thresholds).
    """

    def __init__(self, records: Sequence[ImageRecord], classes: Sequence[str], threshold: float):
        from segkit.dataset import records_to_coco

        self.records, self.classes, self.threshold = list(records), list(classes), threshold
        self.gt = records_to_coco(self.records, self.classes)  # image ids = index in records
        self.results: list[dict[str, Any]] = []
        self.pixels = PixelStats(len(self.classes))
        self._gt_by_image: dict[int, list[dict]] = {}
        for ann in self.gt["annotations"]:
            self._gt_by_image.setdefault(ann["image_id"], []).append(ann)

    def process(self, index: int, prediction: Prediction) -> None:
        """Add the prediction for ``records[index]``: all its detections, whatever their score."""
        rec = self.records[index]
        shape = (rec.height, rec.width)
        if len(prediction) and prediction.masks.shape[1:] != shape:
            raise EvaluateError(f"{rec.path}: prediction is {prediction.masks.shape[2]}x{prediction.masks.shape[1]}, "
                                f"annotation is {rec.width}x{rec.height}")
        self.results += prediction_to_coco(index, prediction.boxes, prediction.labels, prediction.scores,
                                           prediction.masks)
        gt = [(a["category_id"], mask_utils.decode(a["segmentation"]).astype(bool))
              for a in self._gt_by_image.get(index, [])]
        keep = prediction.scores >= self.threshold
        pred = [(int(label), mask) for label, mask, k in zip(prediction.labels, prediction.masks, keep) if k]
        self.pixels.add(gt, pred, shape)

    def evaluate(self) -> dict[str, Any]:
        ap = coco_evaluate(self.gt, self.results)
        return {"bbox": ap["bbox"], "segm": ap["segm"], "semantic": semantic_metrics(self.pixels, self.classes)}


def evaluate_predictions(records: Sequence[ImageRecord], predictions: Sequence[Prediction], classes: Sequence[str],
                         threshold: float) -> dict[str, Any]:
    """Metrics of ``predictions[i]`` (all detections, any score) against ``records[i]``; see the module docstring."""
    evaluator = SegmentationEvaluator(records, classes, threshold)
    for i, prediction in enumerate(predictions):
        evaluator.process(i, prediction)
    return evaluator.evaluate()


def format_table(report: dict[str, Any], classes: Sequence[str]) -> str:
    """Per-class box AP, mask AP, IoU and Dice, then the summary rows."""
    sem = report["semantic"]
    width = max(len(n) for n in [BACKGROUND, "mean / all", *classes])

    def row(name: str, *values: float | None) -> str:
        return f"{name:<{width}}" + "".join("       -" if v is None else f"{v:8.3f}" for v in values)

    lines = [f"{'class':<{width}}" + "".join(f"{h:>8}" for h in ("box AP", "mask AP", "IoU", "Dice"))]
    for name in classes:
        lines.append(row(name, report["bbox"]["per_class"].get(name), report["segm"]["per_class"].get(name),
                         sem["per_class"][name]["iou"], sem["per_class"][name]["dice"]))
    lines.append(row(BACKGROUND, None, None, sem["per_class"][BACKGROUND]["iou"], sem["per_class"][BACKGROUND]["dice"]))
    lines.append(row("mean / all", report["bbox"]["AP"], report["segm"]["AP"], sem["mIoU"], sem["mDice"]))
    lines += [row(key, report["bbox"][key], report["segm"][key]) for key in ("AP50", "AP75")]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots


def precision_recall(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str,
                     iou: float = 0.5) -> dict[str, np.ndarray]:
    """Precision at COCO's 101 recall points per class name, at one IoU threshold (all areas, 100 dets)."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    from segkit.metrics import _coco_from_dict  # the same COCO index coco_evaluate builds

    if not results:
        return {}
    coco_gt = _coco_from_dict(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes([dict(r) for r in results]), iou_type)
        ev.evaluate()
        ev.accumulate()
    t = int(np.argmin(np.abs(ev.params.iouThrs - iou)))
    names = {c["id"]: c["name"] for c in gt["categories"]}
    curves = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = ev.eval["precision"][t, :, k, 0, -1]
        if (p > -1).any():  # -1: the class has no ground truth here
            curves[names[cat_id]] = np.clip(p, 0, None)
    return curves


def plot_pr_curves(gt: dict[str, Any], results: list[dict[str, Any]], path: str | Path) -> Path:
    """Precision-recall curves per class at IoU 0.5, boxes and masks side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    recall = np.linspace(0, 1, 101)
    for ax, iou_type in zip(axes, ("bbox", "segm")):
        curves = precision_recall(gt, results, iou_type)
        for name, precision in curves.items():
            ax.plot(recall, precision, label=f"{name} (AP50 {precision.mean():.2f})")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
               title=f"{'boxes' if iou_type == 'bbox' else 'masks'}, IoU 0.5")
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=8, loc="lower left")
        else:
            ax.text(0.5, 0.5, "no detections", ha="center", va="center")
    return _save(fig, path)


def plot_confusion_matrix(confusion: np.ndarray, names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Pixel confusion matrix, each row normalised to the ground truth's pixels (the diagonal is recall)."""
    plt = _pyplot()
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros(confusion.shape, float), where=rows > 0)
    size = 1.2 + 0.75 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for (r, c), v in np.ndenumerate(norm):
        ax.text(c, r, f"{100 * v:.0f}%" if rows[r, 0] else "-", ha="center", va="center", fontsize=8,
                color="white" if v > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="ground truth", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path
