"""The tasks segkit trains and serves, one object each: what ``--task`` names.

A :class:`~segkit.tasks.base.Task` is the one place that knows its dataset, its model table and
builder (the loss lives in the model), its evaluator and the metric that picks ``best.pt``, how its
model predicts and how its predictions go to Label Studio. The trainer, checkpoints, the
predictor, the commands, the ML backend and the demo ask the task instead of branching on its name.

Adding a task (say panoptic): a folder ``segkit/tasks/panoptic/`` holding its dataset, model,
evaluator and a ``Task`` subclass, one entry in :data:`TASKS` below, and its words in
:mod:`segkit.tasks.wording`.
"""
from __future__ import annotations

from segkit.tasks.base import Evaluator, Task
from segkit.tasks.wording import WORDING, Wording, wording
from segkit.tasks.instance import InstanceTask
from segkit.tasks.semantic import SemanticTask

TASKS: dict[str, Task] = {"instance": InstanceTask(), "semantic": SemanticTask()}


def get_task(name: str | None) -> Task:
    """The task called ``name`` (None, as in checkpoints from before tasks: instance)."""
    try:
        return TASKS[name or "instance"]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None


__all__ = ["TASKS", "WORDING", "Evaluator", "Task", "Wording", "get_task", "wording"]
