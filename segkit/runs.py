"""A run folder: its name, metrics.csv, curves and prediction previews."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch.distributed as dist

from segkit import plots


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



def write_outputs(out: Path, history: list[dict], test: dict | None = None) -> None:
    columns = ["epoch", "train_loss", "val_loss", "val_bbox_map", "val_segm_map", "val_segm_map50", "lr", "seconds"]
    for row in history:
        columns += [k for k in row if k not in columns]
    tmp = out / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, out / "metrics.csv")
    plots.plot_losses(history, out / "loss_curves.png", test)
    plots.plot_metrics(history, out / "metrics.png")



def print_epoch(row: dict) -> None:
    parts = [f"epoch {row['epoch']}", f"train loss {row['train_loss']:.3f}"]
    if "val_loss" in row:
        parts += [f"val loss {row['val_loss']:.3f}", f"box AP {row['val_bbox_map']:.3f}",
                  f"mask AP {row['val_segm_map']:.3f}", f"mask AP50 {row['val_segm_map50']:.3f}"]
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.0f}s"]
    print(" | ".join(parts), flush=True)



def draw_previews(model, dataset, classes, threshold: float, path: Path, n: int = 4) -> None:
    """Val images with predictions beside ground truth, drawn with the demo's overlay code."""
    from PIL import Image

    from segkit.images import load_image
    from segkit.predict import Predictor
    from segkit.visualize import side_by_side

    predictor = Predictor(model, classes, threshold, device=next(model.parameters()).device)
    panels = []
    for record in dataset.images[:n]:
        image = load_image(record.path)
        gt = ground_truth_prediction(record, classes)
        panels.append(side_by_side(image, predictor(image), gt))
    if not panels:
        return
    width = max(p.width for p in panels)
    sheet = Image.new("RGB", (width, sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height
    sheet.save(path)



def ground_truth_prediction(record, classes):
    from segkit.predict import Prediction

    instances = [i for i in record.instances if i.segmentation is not None]
    masks = np.stack([i.mask(record.height, record.width).astype(bool) for i in instances]) if instances else \
        np.zeros((0, record.height, record.width), dtype=bool)
    return Prediction(boxes=np.array([i.bbox for i in instances], dtype=np.float32).reshape(-1, 4),
                      labels=np.array([classes.index(i.label) + 1 for i in instances], dtype=np.int64),
                      class_names=[i.label for i in instances], scores=np.ones(len(instances), dtype=np.float32),
                      masks=masks)
