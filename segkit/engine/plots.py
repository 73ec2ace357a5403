"""Plots with matplotlib: training curves (losses, AP per epoch), precision-recall curves, confusion matrix."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from segkit.atomic import atomic_open  # noqa: E402

LOSS_PARTS = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg",
              "loss_ce", "loss_dice")


def plot_losses(history: list[dict], path: str | Path, test: dict | None = None) -> Path:
    """One subplot per loss component: train and val per epoch, test (best checkpoint) as a dashed line."""
    parts = [p for p in LOSS_PARTS if any(f"train_{p}" in row for row in history)]
    cols = 3
    rows = -(-len(parts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    epochs = [row["epoch"] for row in history]
    for ax, part in zip(axes.flat, parts):
        for split, style in (("train", "-o"), ("val", "-s")):
            ys = [row.get(f"{split}_{part}") for row in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, [float("nan") if y is None else y for y in ys], style, ms=3, label=split)
        if test and f"test_{part}" in test:
            ax.axhline(test[f"test_{part}"], color="C2", ls="--", label="test (best)")
        ax.set_title("total loss" if part == "loss" else part.removeprefix("loss_"))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(parts):]:
        ax.axis("off")
    return _save(fig, path)


def plot_metrics(history: list[dict], path: str | Path, keys: Sequence[str],
                 axes: tuple[str, str] = ("AP", "validation AP")) -> Path:
    """Validation curves of the metrics.csv columns ``keys`` (the task's), with (y label, title) ``axes``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [row["epoch"] for row in history]
    for key in keys:
        ys = [row.get(key) for row in history]
        if any(y is not None for y in ys):
            ax.plot(epochs, [float("nan") if y is None else y for y in ys], "-o", ms=3,
                    label=key.removeprefix("val_").replace("_map", " AP").replace("iou_", "IoU "))
    ax.set(xlabel="epoch", ylabel=axes[0], ylim=(0, 1), title=axes[1])
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    else:  # --eval-every skipped every epoch so far
        ax.text(0.5, 0.5, "not evaluated yet", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_pr_curves(report: dict[str, Any], path: str | Path) -> Path:
    """Precision-recall curves per class at IoU 0.5, boxes and masks side by side, from a metrics report."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    recall = np.linspace(0, 1, 101)
    for ax, iou_type in zip(axes, ("bbox", "segm")):
        curves = report[iou_type].get("pr_curves", {})
        for name, precision in curves.items():
            ax.plot(recall, precision, label=f"{name} (AP50 {np.mean(precision):.2f})")
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


def _save(fig, path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=100, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
