"""The per-task parts of ``--task semantic`` that the trainer, ``segkit evaluate`` and the predictor call:
the dataset's targets, the evaluation (per-class IoU and Dice, pixel accuracy) and class maps from logits.

Everything else (loop, optimizers, schedules, AMP, DDP, resume, run folder, checkpoints) is the
instance trainer's own. Targets follow :mod:`segkit.data.class_map`'s rule; the models are in
:mod:`segkit.models.semantic`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from segkit.data.class_map import IGNORE_INDEX, class_map
from segkit.data.dataset import SegmentationDataset
from segkit.data.images import load_image
from segkit.engine.metrics import BACKGROUND, PixelStats, semantic_metrics
from segkit.data.records import ImageRecord

TASKS = ("instance", "semantic")
SCORE_KEY = "val_miou"  # what picks best.pt and early stopping (the instance task: val_segm_map)


class SemanticDataset(SegmentationDataset):
    """Images with their class maps: ``(image, {"semantic": (H, W) int64, "image_id": i})``."""

    def load_class_map(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``i`` before augmentation: HxWx3 uint8 RGB and its (H, W) uint8 class map."""
        rec = self.images[i]
        image = np.asarray(load_image(rec.path))
        return image, class_map(rec, self.classes, *image.shape[:2])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        image, classes = self.load_class_map(i)
        return self.transform.semantic(image, classes, image_id=i)


@torch.inference_mode()
def predict_maps(model: torch.nn.Module, images: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(class map (H, W) uint8, mean confidence per label 0..C) of each image, from a semantic model in eval mode."""
    results = []
    for logits in model(images):
        probs, labels = logits.float().softmax(0).max(0)
        n = logits.shape[0]
        counts = torch.bincount(labels.ravel(), minlength=n)
        sums = torch.bincount(labels.ravel(), weights=probs.ravel(), minlength=n)
        confidence = torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)
        results.append((labels.to(torch.uint8).cpu().numpy(), confidence.cpu().numpy()))
    return results


class SemanticEvaluator:
    """A pixel confusion matrix over a split (ignore pixels left out), turned into per-class IoU and Dice.

    As for instance models (:func:`segkit.engine.metrics.semantic_metrics`): pixels are summed over the split
    before dividing, background is reported but left out of mIoU and mDice. Pixel accuracy counts
    every judged pixel, background included.
    """

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)
        n = len(self.classes) + 1
        self.confusion = np.zeros((n, n), np.int64)

    def process(self, truth: np.ndarray, predicted: np.ndarray) -> None:
        """One image: ground-truth and predicted (H, W) class maps of the same size."""
        if truth.shape != predicted.shape:
            raise ValueError(f"prediction is {predicted.shape}, ground truth {truth.shape}")
        valid = truth != IGNORE_INDEX
        n = len(self.confusion)
        pairs = truth[valid].astype(np.int64) * n + predicted[valid].astype(np.int64)
        self.confusion += np.bincount(pairs, minlength=n * n).reshape(n, n)

    def evaluate(self) -> dict[str, Any]:
        """``{"per_class": {name: {"iou", "dice"}}, "mIoU", "mDice", "pixel_accuracy"}``: the instance
        report's ``semantic`` keys, plus pixel accuracy."""
        report = semantic_metrics(PixelStats.from_confusion(self.confusion), self.classes)
        total = int(self.confusion.sum())
        report["pixel_accuracy"] = float(np.trace(self.confusion)) / total if total else None
        return report


def evaluate(model, loader, device: torch.device, prefix: str = "val",
             show_progress: bool = True) -> tuple[dict[str, float], dict]:
    """Losses and IoU/Dice/pixel accuracy on ``loader``'s :class:`SemanticDataset`, at each image's own size.

    Returns (flat row for metrics.csv, ``{"semantic": SemanticEvaluator.evaluate()}``).
    """
    from segkit.engine.loops import compute_losses  # the instance trainer's, unchanged

    row = {f"{prefix}_{k}": v for k, v in compute_losses(model, loader, device, f"{prefix} loss",
                                                       show_progress).items()}
    model.eval()
    evaluator = SemanticEvaluator(loader.dataset.classes)
    for images, targets in tqdm(loader, desc=f"{prefix} IoU", leave=False, dynamic_ncols=True,
                                disable=not show_progress):
        maps = predict_maps(model, [im.to(device, non_blocking=True) for im in images])
        for (predicted, _), target in zip(maps, targets):
            evaluator.process(target["semantic"].numpy(), predicted)
    report = evaluator.evaluate()
    return {**row, **metrics_row(report, prefix)}, {"semantic": report}


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


def evaluate_predictor(predictor, records: Sequence[ImageRecord], classes: Sequence[str], batch_size: int = 1,
                       show_progress: bool = True) -> SemanticEvaluator:
    """Run a semantic :class:`segkit.inference.predictor.Predictor` over ``records`` against their class maps."""
    evaluator = SemanticEvaluator(classes)
    with tqdm(total=len(records), desc="evaluate", unit="img", dynamic_ncols=True, disable=not show_progress) as bar:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            images = [load_image(r.path) for r in batch]
            for record, image, prediction in zip(batch, images, predictor.predict_batch(images)):
                evaluator.process(class_map(record, classes, image.height, image.width), prediction.class_map)
            bar.update(len(batch))
    return evaluator


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

