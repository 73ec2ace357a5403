"""How good predictions are: COCO AP for boxes and masks, and per-class IoU and Dice of the pixels.

``segkit evaluate`` and training's per-epoch validation feed the same :class:`SegmentationEvaluator`.
Beside AP and IoU/Dice it reports Boundary IoU per class (:mod:`segkit.evaluation.boundary`): how well the
edges of the masks above the score threshold match, where mask IoU is dominated by the interiors.

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segkit.evaluation.boundary import BoundaryStats
from segkit.evaluation.coco import coco_evaluate, prediction_to_coco, records_to_coco
from segkit.structures.masks import Crop
from segkit.structures.prediction import Prediction
from segkit.data.records import ImageRecord

BACKGROUND = "background"


class EvaluateError(ValueError):
    """The requested evaluation cannot be done; the message says what would work."""


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

    @classmethod
    def from_confusion(cls, confusion: np.ndarray) -> PixelStats:
        """The counts of a (C + 1) x (C + 1) pixel confusion matrix (rows ground truth): a semantic model's."""
        stats = cls(len(confusion) - 1)
        stats.confusion = np.asarray(confusion, np.int64).copy()
        stats.intersection = np.diag(stats.confusion).copy()
        stats.gt_area, stats.pred_area = stats.confusion.sum(axis=1), stats.confusion.sum(axis=0)
        stats.union = stats.gt_area + stats.pred_area - stats.intersection
        return stats

    def add(self, gt_masks: list[tuple[int, Crop]], pred_masks: list[tuple[int, Crop]],
            shape: tuple[int, int]) -> None:
        """One image: ``(label, mask crop)`` pairs; ground truth in drawing order, predictions best first."""
        gt_union = [np.zeros(shape, bool) for _ in range(self.num_classes + 1)]
        pred_union = [np.zeros(shape, bool) for _ in range(self.num_classes + 1)]
        gt_map, pred_map = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        for label, crop in gt_masks:  # a later annotation is drawn on top, as in the annotation tools
            gt_union[label][crop.window] |= crop.mask
            gt_map[crop.window][crop.mask] = label
        for label, crop in reversed(pred_masks):  # the most confident instance ends up on top
            pred_union[label][crop.window] |= crop.mask
            pred_map[crop.window][crop.mask] = label
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
    """COCO AP and semantic IoU/Dice, fed a batch at a time so that masks never pile up in memory.

    The :class:`segkit.tasks.Evaluator` interface: ``process(targets, predictions)`` takes the predictions
    for ``records[target["image_id"]]`` with *all* their detections; ``summarize()`` returns
    ``{"bbox", "segm", "semantic", "boundary"}`` (see the module docstring for thresholds).
    """

    def __init__(self, records: Sequence[ImageRecord], classes: Sequence[str], threshold: float,
                 ground_truth: dict | None = None):
        self.records, self.classes, self.threshold = list(records), list(classes), threshold
        # image ids = index in records; ``ground_truth`` is records_to_coco(records, classes) made earlier
        # (training evaluates the same split every epoch: its masks are decoded once)
        self.gt = ground_truth if ground_truth is not None else records_to_coco(self.records, self.classes)
        self._gt_by_image: dict[int, list[dict]] = {}
        for ann in self.gt["annotations"]:
            self._gt_by_image.setdefault(ann["image_id"], []).append(ann)
        self.reset()

    def reset(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.pixels = PixelStats(len(self.classes))
        self.boundary = BoundaryStats(len(self.classes))

    def process(self, targets: Sequence[dict], predictions: Sequence[Prediction]) -> None:
        """Add the predictions of a batch: all their detections, whatever their score."""
        for target, prediction in zip(targets, predictions, strict=True):
            self._add(int(target["image_id"]), prediction)

    def _add(self, index: int, prediction: Prediction) -> None:
        rec = self.records[index]
        shape = (rec.height, rec.width)
        if len(prediction) and prediction.image_size != (rec.width, rec.height):
            width, height = prediction.image_size
            raise EvaluateError(f"{rec.path}: prediction is {width}x{height}, annotation is {rec.width}x{rec.height}")
        self.results += prediction_to_coco(index, prediction)
        gt = [(a["category_id"], Crop.from_dense(mask_utils.decode(a["segmentation"])))
              for a in self._gt_by_image.get(index, [])]
        keep = prediction.scores >= self.threshold
        crops = prediction.instance_masks.crops
        pred = [(int(label), crop) for label, crop, k in zip(prediction.labels, crops, keep) if k]
        self.pixels.add(gt, pred, shape)
        self.boundary.add(gt, pred, shape)

    @property
    def confusion(self) -> np.ndarray:
        """The pixel confusion matrix of the masks above the threshold (rows: ground truth; 0: background)."""
        return self.pixels.confusion

    def summarize(self) -> dict[str, Any]:
        ap = coco_evaluate(self.gt, self.results)
        return {"bbox": ap["bbox"], "segm": ap["segm"], "semantic": semantic_metrics(self.pixels, self.classes),
                "boundary": self.boundary.report(self.classes)}


def evaluate_predictions(records: Sequence[ImageRecord], predictions: Sequence[Prediction], classes: Sequence[str],
                         threshold: float) -> dict[str, Any]:
    """Metrics of ``predictions[i]`` (all detections, any score) against ``records[i]``; see the module docstring."""
    evaluator = SegmentationEvaluator(records, classes, threshold)
    evaluator.process([{"image_id": i} for i in range(len(predictions))], predictions)
    return evaluator.summarize()


def format_table(report: dict[str, Any], classes: Sequence[str]) -> str:
    """Per-class box AP, mask AP, IoU, Dice and Boundary IoU, then the summary rows."""
    sem, boundary = report["semantic"], report["boundary"]
    width = max(len(n) for n in [BACKGROUND, "mean / all", *classes])

    def row(name: str, *values: float | None) -> str:
        return f"{name:<{width}}" + "".join("       -" if v is None else f"{v:8.3f}" for v in values)

    lines = [f"{'class':<{width}}" + "".join(f"{h:>8}" for h in ("box AP", "mask AP", "IoU", "Dice", "bIoU"))]
    for name in classes:
        lines.append(row(name, report["bbox"]["per_class"].get(name), report["segm"]["per_class"].get(name),
                         sem["per_class"][name]["iou"], sem["per_class"][name]["dice"], boundary["per_class"][name]))
    lines.append(row(BACKGROUND, None, None, sem["per_class"][BACKGROUND]["iou"], sem["per_class"][BACKGROUND]["dice"]))
    lines.append(row("mean / all", report["bbox"]["AP"], report["segm"]["AP"], sem["mIoU"], sem["mDice"],
                     boundary["iou"]))
    lines += [row(key, report["bbox"][key], report["segm"][key]) for key in ("AP50", "AP75")]
    return "\n".join(lines)
