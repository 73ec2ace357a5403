"""Training curves with matplotlib: losses (train, val, test) and AP per epoch."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

LOSS_PARTS = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
AP_KEYS = ("val_bbox_map", "val_bbox_map50", "val_segm_map", "val_segm_map50", "val_segm_map75")


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


def plot_metrics(history: list[dict], path: str | Path) -> Path:
    """Validation AP curves for boxes and masks."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [row["epoch"] for row in history]
    for key in AP_KEYS:
        ys = [row.get(key) for row in history]
        if any(y is not None for y in ys):
            ax.plot(epochs, [float("nan") if y is None else y for y in ys], "-o", ms=3,
                    label=key.removeprefix("val_").replace("_map", " AP"))
    ax.set(xlabel="epoch", ylabel="AP", ylim=(0, 1), title="validation AP")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    else:  # --eval-every skipped every epoch so far
        ax.text(0.5, 0.5, "not evaluated yet", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
