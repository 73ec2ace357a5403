"""A run folder: its name, and the per-epoch history written as metrics.csv and curves."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import torch.distributed as dist

from segkit.engine import plots
from segkit.atomic import atomic_open

CSV_COLUMNS = ["epoch", "train_loss", "val_loss", "val_bbox_map", "val_segm_map", "val_segm_map50", "lr", "seconds"]


def newest_best(root: str | os.PathLike = "runs") -> Path | None:
    """The most recently written ``<root>/*/best.pt``, or None: what to serve when no checkpoint is named."""
    found = sorted(Path(root).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def next_run_dir(root: Path, name: str, main: bool, world: int) -> Path:
    """runs/exp, runs/exp2, ...: a new folder per run, so nothing is overwritten."""
    if world > 1:  # every rank must agree on one folder: rank 0 decides
        chosen = [str(_next_free(root, name))] if main else [""]
        dist.broadcast_object_list(chosen, src=0)
        return Path(chosen[0])
    return _next_free(root, name)


def _next_free(root: Path, name: str) -> Path:
    path, n = root / name, 1
    while path.exists():
        n += 1
        path = root / f"{name}{n}"
    return path


def write_history(out: Path, history: list[dict], test: dict | None = None) -> None:
    """metrics.csv (one row per epoch), loss_curves.png (with the test losses, when given) and metrics.png."""
    columns = list(CSV_COLUMNS)
    if any("train_loss_ce" in row or "train_loss_dice" in row for row in history):  # a semantic run: no AP
        columns = [c for c in columns if not c.startswith(("val_bbox", "val_segm"))]
    for row in history:
        columns += [k for k in row if k not in columns]
    with atomic_open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(history)
    plots.plot_losses(history, out / "loss_curves.png", test)
    plots.plot_metrics(history, out / "metrics.png")
