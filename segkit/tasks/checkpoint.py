"""A model as a checkpoint dict and back, each as its task says (:mod:`segkit.models.checkpoint` writes and
reads the dicts, knowing nothing of tasks)."""
from __future__ import annotations

from typing import Any

import torch

from segkit.models.checkpoint import task_of
from segkit.tasks import get_task


def make_checkpoint(model: torch.nn.Module, arch: str, classes: list[str], img_size: int,
                    score_threshold: float = 0.5, frozen_bn: bool = False, task: str = "instance",
                    **extra: Any) -> dict[str, Any]:
    """The checkpoint dict of ``model``: what :func:`model_from_checkpoint` needs to rebuild it.

    ``task`` is ``"instance"`` (Mask R-CNN) or ``"semantic"`` (:mod:`segkit.models.semantic`); a
    checkpoint without it is an instance model.

    ``mask_head`` (``"standard"`` or ``"pointrend"``, with ``mask_resolution``) is read from the model:
    it says which mask head to rebuild, and lets an exporter refuse what its backend cannot run.
    ``extra`` adds run details: ``epoch``, ``metrics``, ``config``, ``split``, and for resuming the
    optimizer, scheduler, scaler, ``history``, ``step`` and ``rng``.
    """
    return {"model": model.state_dict(), "arch": arch, "classes": list(classes), "img_size": int(img_size),
            "score_threshold": float(score_threshold), "frozen_bn": bool(frozen_bn), "task": task,
            **get_task(task).checkpoint_fields(model), **extra}


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the trained model from a loaded checkpoint alone (no download, no dataset), as its task does."""
    return get_task(task_of(ckpt)).model_from_checkpoint(ckpt)
