"""Optimizer, per-step learning-rate schedule (warm-up, then cosine or steps) and the AMP scaler."""
from __future__ import annotations

import math

import torch


def make_optimization(cfg, model: torch.nn.Module, steps_per_epoch: int, device: torch.device):
    """Optimizer over the trainable parameters, per-step LR schedule, and the AMP scaler (CUDA only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LrSchedule(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    return optimizer, scheduler, scaler


def restore_optimization(resume: dict, optimizer, scheduler, scaler) -> None:
    """Continue a resumed run's optimizer, scaler and step count under this run's schedule.

    The step count is restored, the schedule's shape is this run's: resuming with more --epochs stretches
    the decay over them, where the saved shape would train on at its end (a learning rate of 0 for cosine).
    """
    optimizer.load_state_dict(resume["optimizer"])
    scaler.load_state_dict(resume["scaler"])
    scheduler.load_state_dict({**resume["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)  # what the saved step would use (the same, unstretched)


class LrSchedule:
    """Learning-rate factor per step: linear warm-up, then cosine to zero or x0.1 steps."""

    def __init__(self, cfg, steps_per_epoch: int):
        self.total = max(cfg.epochs * steps_per_epoch, 1)
        self.warmup = min(cfg.warmup_iters, steps_per_epoch)
        self.milestones = [round(self.total * 2 / 3), round(self.total * 8 / 9)]
        self.cosine = cfg.schedule == "cosine"

    def __call__(self, step: int) -> float:
        warm = 1.0
        if step < self.warmup:
            alpha = step / self.warmup
            warm = 0.001 * (1 - alpha) + alpha  # torchvision's warm-up: from lr/1000 to lr
        if self.cosine:
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, self.total) / self.total))
        return warm * 0.1 ** sum(step >= m for m in self.milestones)
