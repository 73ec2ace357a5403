"""The loops: ``train_one_epoch``, and ``evaluate`` (losses without gradients, then the task's metrics).

They know no task: what a model predicts and how it is scored come from a :class:`segkit.tasks.Task`.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from segkit.data.images import load_image
from segkit.inference.tiles import Tiling, predict_tiled
from segkit.models.forward import image_tensors

# torchvision's loss names, shortened for the progress bar
SHORT = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_mask": "mask", "loss_objectness": "obj",
         "loss_rpn_box_reg": "rpn", "loss_mask_point": "point", "loss_ce": "ce", "loss_dice": "dice"}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the batch's images."""


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def reduce_losses(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average the loss components over all processes so that every rank logs the same numbers."""
    values = torch.stack([v.detach().float() for v in losses.values()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return {k: float(v) for k, v in zip(losses, values)}


def train_one_epoch(model, optimizer, loader: Iterable, device: torch.device, scheduler=None, scaler=None,
                    clip_grad: float | None = None, describe_batch: Callable[[list], str] = str,
                    desc: str = "train", on_step: Callable[[int], None] | None = None,
                    show_progress: bool = True, skip: int = 0,
                    on_losses: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each loss component and of their sum (``loss``).

    The first ``skip`` batches were trained on before an interruption: they are loaded, so that the
    random augmentation streams line up with an uninterrupted run, but not trained on again.
    ``on_step(i)`` is called after the i-th batch of the epoch (skipped ones included) is trained on;
    ``on_losses(i, losses)`` then gets that batch's losses (``loss``, their sum, and each component).
    """
    model.train()
    sums: dict[str, float] = defaultdict(float)
    n_batches, n_images, start = 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not show_progress)
    for step, (images, targets) in enumerate(bar, start=1):
        if step <= skip:
            continue
        images, targets = _to_device(images, targets, device)
        with torch.autocast(device.type, enabled=scaler is not None and scaler.is_enabled()):
            losses = model(images, targets)
        loss = sum(losses.values())
        logged = reduce_losses(losses)
        total = sum(logged.values())
        if not math.isfinite(total):
            raise NonFiniteLossError(f"loss is {total} ({', '.join(f'{k}={v:.4g}' for k, v in logged.items())}) "
                                     f"on the batch of {describe_batch(targets)}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # so that clipping sees true gradient norms
        else:
            loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()  # per iteration: warm-up and decay are defined in iterations
        for k, v in logged.items():
            sums[k] += v
        sums["loss"] += total
        n_batches += 1
        n_images += len(images)
        if on_step is not None:
            on_step(step)
        if on_losses is not None:
            on_losses(step, {"loss": total, **logged})
        bar.set_postfix(loss=f"{total:.3f}", **{SHORT.get(k, k): f"{v:.3f}" for k, v in logged.items()},
                        lr=f"{optimizer.param_groups[0]['lr']:.1e}",
                        img_s=f"{n_images / (time.perf_counter() - start):.1f}")
    return {k: v / max(n_batches, 1) for k, v in sums.items()}


@contextmanager
def loss_mode(model: torch.nn.Module):
    """Train mode (torchvision's models only return losses then) with batch-norm statistics frozen,
    so that computing validation losses does not change the model."""
    was_training = model.training
    model.train()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in bns:
        m.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def compute_losses(model, loader: Iterable, device: torch.device, desc: str = "val loss",
                   show_progress: bool = True) -> dict[str, float]:
    """Mean loss components on a dataset, without gradients and without touching the weights."""
    sums: dict[str, float] = defaultdict(float)
    n = 0
    with loss_mode(model):
        for images, targets in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not show_progress):
            images, targets = _to_device(images, targets, device)
            losses = model(images, targets)
            for k, v in losses.items():
                sums[k] += float(v)
            sums["loss"] += float(sum(losses.values()))
            n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def evaluate(model, loader, device: torch.device, task, evaluator, prefix: str = "val",
             show_progress: bool = True, tiling: Tiling | None = None) -> tuple[dict[str, float], dict]:
    """Losses, then ``task``'s metrics on ``loader``'s dataset (one of ``task.dataset``'s).

    ``task`` is a :class:`segkit.tasks.Task`, ``evaluator`` one of its evaluators over the dataset's
    images; ``tiling``: predict the whole images tile by tile (the losses are those of the dataset's
    samples: tiles, for tiled training). Returns (flat row of numbers for metrics.csv, the evaluator's
    full report).
    """
    losses = compute_losses(model, loader, device, f"{prefix} loss", show_progress)
    evaluator.reset()
    predict_into(model, loader, device, task, evaluator, f"{prefix} metrics", show_progress, tiling)
    report = evaluator.summarize()
    return {**{f"{prefix}_{k}": v for k, v in losses.items()}, **task.metrics_row(report, prefix)}, report


@torch.inference_mode()
def predict_into(model, loader: Iterable, device: torch.device, task, evaluator, desc: str = "val metrics",
                 show_progress: bool = True, tiling: Tiling | None = None) -> None:
    """Run the model in eval mode and feed everything it predicts, at any score, to ``evaluator``.

    Instance masks stay at their boxes' size (:func:`segkit.models.forward.detect`), as in the
    Predictor: 100 detections at torchvision's 0.05 floor would otherwise be 100 full-size float images.
    With ``tiling``, the dataset's whole images are read and predicted tile by tile as ``--tile`` does
    (:mod:`segkit.inference.tiles`), whatever samples the loader gives: no full-size mask is decoded.
    """
    model.eval()
    if tiling is not None:
        for i, record in enumerate(tqdm(loader.dataset.images, desc=desc, leave=False, dynamic_ncols=True,
                                        disable=not show_progress)):
            evaluator.process([{"image_id": i}], [_tiled(model, task, evaluator.classes, device, record.path, tiling)])
        return
    for images, targets in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not show_progress):
        images = [im.to(device, non_blocking=True) for im in images]
        evaluator.process(targets, task.predict(model, images, evaluator.classes, 0.0))


def _tiled(model, task, classes: list[str], device: torch.device, path, tiling: Tiling):
    """The image at ``path`` predicted tile by tile, every detection kept."""
    def predict(tile):
        return task.predict(model, image_tensors([tile], device), classes, 0.0)[0]
    return predict_tiled(predict, load_image(path), tiling)
