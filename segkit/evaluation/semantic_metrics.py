"""How good a semantic model's class maps are (``--task semantic``): per-class IoU and Dice, pixel accuracy.

The same rules as the instance report's pixel metrics (:func:`segkit.evaluation.metrics.semantic_metrics`):
pixels are summed over the split before dividing, background is reported but left out of mIoU and
mDice. Targets follow :mod:`segkit.data.class_map`'s rule; the models are in :mod:`segkit.models.semantic`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from segkit.data.class_map import IGNORE_INDEX, class_map
from segkit.data.records import ImageRecord
from segkit.evaluation.metrics import BACKGROUND, PixelStats, semantic_metrics
from segkit.structures.prediction import SemanticPrediction


class SemanticEvaluator:
    """A pixel confusion matrix over a split (ignore pixels left out), turned into per-class IoU and Dice.

    The :class:`segkit.tasks.Evaluator` interface. A target carries its class map (``"semantic"``, as the
    dataset gives it) or names its record (``"image_id"``), whose class map is then drawn at the
    prediction's size. Pixel accuracy counts every judged pixel, background included.
    """

    def __init__(self, classes: Sequence[str], records: Sequence[ImageRecord] = ()):
        self.classes, self.records = list(classes), list(records)
        self.reset()

    def reset(self) -> None:
        n = len(self.classes) + 1
        self.confusion = np.zeros((n, n), np.int64)

    def process(self, targets: Sequence[dict], predictions: Sequence[SemanticPrediction]) -> None:
        """Add a batch: each prediction's class map against its target's."""
        for target, prediction in zip(targets, predictions, strict=True):
            predicted = prediction.class_map
            truth = target.get("semantic")
            if truth is None:
                truth = class_map(self.records[int(target["image_id"])], self.classes, *predicted.shape)
            self.add(truth.numpy() if isinstance(truth, torch.Tensor) else truth, predicted)

    def add(self, truth: np.ndarray, predicted: np.ndarray) -> None:
        """One image: ground-truth and predicted (H, W) class maps of the same size."""
        if truth.shape != predicted.shape:
            raise ValueError(f"prediction is {predicted.shape}, ground truth {truth.shape}")
        valid = truth != IGNORE_INDEX
        n = len(self.confusion)
        pairs = truth[valid].astype(np.int64) * n + predicted[valid].astype(np.int64)
        self.confusion += np.bincount(pairs, minlength=n * n).reshape(n, n)

    def summarize(self) -> dict[str, Any]:
        """``{"per_class": {name: {"iou", "dice"}}, "mIoU", "mDice", "pixel_accuracy"}``: the instance
        report's ``semantic`` keys, plus pixel accuracy."""
        report = semantic_metrics(PixelStats.from_confusion(self.confusion), self.classes)
        total = int(self.confusion.sum())
        report["pixel_accuracy"] = float(np.trace(self.confusion)) / total if total else None
        return report


def metrics_row(report: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a semantic report as metrics.csv columns (NaN where a class has no pixels anywhere)."""
    def num(v):
        return float("nan") if v is None else float(v)

    row = {f"{prefix}_miou": num(report["mIoU"]), f"{prefix}_mdice": num(report["mDice"]),
           f"{prefix}_pixel_accuracy": num(report["pixel_accuracy"])}
    for name, values in report["per_class"].items():
        row[f"{prefix}_iou_{name}"] = num(values["iou"])
        row[f"{prefix}_dice_{name}"] = num(values["dice"])
    return row


def format_table(report: dict[str, Any], classes: Sequence[str]) -> str:
    """Per-class IoU and Dice, background, the means and pixel accuracy."""
    width = max(len(n) for n in [BACKGROUND, "mean", "pixel accuracy", *classes])

    def row(name: str, *values: float | None) -> str:
        return f"{name:<{width}}" + "".join("       -" if v is None else f"{v:8.3f}" for v in values)

    per_class = report["per_class"]
    lines = [f"{'class':<{width}}{'IoU':>8}{'Dice':>8}"]
    lines += [row(name, per_class[name]["iou"], per_class[name]["dice"]) for name in [*classes, BACKGROUND]]
    lines += [row("mean", report["mIoU"], report["mDice"]), row("pixel accuracy", report["pixel_accuracy"])]
    return "\n".join(lines)
