"""A run folder: its name, and the per-epoch history written as metrics.csv and curves."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import torch.distributed as dist

from segkit.engine import plots
from segkit.tasks import Task
from segkit.tasks.wording import wording
from segkit.atomic import atomic_open



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


def write_history(out: Path, history: list[dict], task: Task, test: dict | None = None,
                  draw: bool = True) -> None:
    """metrics.csv (one row per epoch, ``task``'s main columns first) and, with ``draw``, loss_curves.png
    (with the test losses, when given) and metrics.png (the task's validation curves)."""
    columns = list(task.csv_columns)
    for row in history:
        columns += [k for k in row if k not in columns]
    with atomic_open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(history)
    if not draw:
        return
    plots.plot_losses(history, out / "loss_curves.png", test)
    plots.plot_metrics(history, out / "metrics.png", task.curve_keys(history), wording(task.name).curve_axes)
