"""What every task provides: :class:`Task`, and the :class:`Evaluator` interface its metrics share."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from segkit.data.records import ImageRecord


class Evaluator(Protocol):
    """Metrics over a split, fed a batch at a time (as detectron2's ``DatasetEvaluator``).

    ``targets[k]["image_id"]`` is the index of the image in the records the evaluator was made with;
    ``predictions[k]`` is what the task's model predicted for it, every detection kept.
    """

    classes: list[str]

    def reset(self) -> None:
        """Forget everything processed so far."""

    def process(self, targets: Sequence[dict], predictions: Sequence[Any]) -> None:
        """Add one batch."""

    def summarize(self) -> dict[str, Any]:
        """The report of everything processed."""


class Task:
    """One kind of segmentation; subclasses fill in each part (see :mod:`segkit.tasks`)."""

    name: str  # its words for people are in :mod:`segkit.tasks.wording`
    # training: --model choices and the default, what picks best.pt, what the run reports
    architectures: dict[str, Any]
    default_model: str
    score_key: str  # the metrics.csv column that picks best.pt and drives early stopping
    report_key: str  # the key of the full report in test_metrics.json
    csv_columns: tuple[str, ...]  # metrics.csv's first columns; the rest follow in the rows' order
    # predicting and serving
    prediction: type  # what its predictor returns (its ``TABLE_COLUMNS`` head the demo's table)
    channels_last: bool = False  # the predictor runs its eager model in channels-last memory format on a CPU
    has_scores: bool = True  # its predictions have scores to threshold (the demo's slider)
    region: str  # the Label Studio region its predictions are sent as: "polygon" or "brush"
    has_pr_curves: bool = False  # its report holds precision-recall curves (``segkit evaluate --out``)

    def curve_keys(self, history: Sequence[dict]) -> list[str]:
        """The metrics.csv columns metrics.png draws."""
        raise NotImplementedError

    def build_model(self, cfg: Any, classes: list[str], resumed: bool) -> nn.Module:
        """The model for training run ``cfg``; resumed runs get their weights from last.pt afterwards."""
        raise NotImplementedError

    def starting_weights(self, cfg: Any) -> dict[str, str] | None:
        """Where each part of run ``cfg``'s model starts from, for the run's first lines and its card; None: not told."""
        return None

    def model_from_checkpoint(self, ckpt: dict[str, Any]) -> nn.Module:
        """The trained model, rebuilt from a loaded checkpoint alone (no download, no dataset)."""
        raise NotImplementedError

    def checkpoint_fields(self, model: nn.Module) -> dict[str, Any]:
        """What a checkpoint records about ``model`` beyond the common fields."""
        return {}

    def frozen_bn(self, cfg: Any) -> bool:
        """Whether run ``cfg`` keeps batch norm frozen (recorded so that the model rebuilds alike)."""
        return False

    def dataset(self, images: Sequence[ImageRecord], classes: Sequence[str], transform,
                tile: int | None = None) -> Dataset:
        """Training or evaluation samples of ``images``; ``tile``: random crops of that size at full resolution."""
        raise NotImplementedError

    def loader_options(self, cfg: Any, train: bool, n_images: int, world: int) -> dict[str, Any]:
        """``batch_size`` and ``drop_last`` of a split's DataLoader."""
        return {"batch_size": cfg.batch_size, "drop_last": False}

    def ground_truth(self, images: Sequence[ImageRecord], classes: Sequence[str]) -> Any:
        """What the evaluator needs of a split that does not change between epochs (made once), or None."""
        return None

    def evaluator(self, images: Sequence[ImageRecord], classes: Sequence[str], threshold: float,
                  ground_truth: Any = None) -> Evaluator:
        """A fresh evaluator of predictions of ``images``."""
        raise NotImplementedError

    def predict(self, model: nn.Module, images: list[torch.Tensor], classes: list[str],
                threshold: float, size: int | None = None) -> list[Any]:
        """Predictions of an eager model in eval mode on float (3, H, W) images, keeping scores >= ``threshold``;
        ``size``: resize the images' shorter side to it instead of the model's own size."""
        raise NotImplementedError

    def score_floor(self, model: nn.Module) -> float:
        """The lowest score the model returns at all."""
        return 0.0

    def cap_detections(self, model: nn.Module, n: int) -> None:
        """Make the model return at most ``n`` detections per image, where it detects at all."""

    def describe(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """What a predictor reports about its model beyond the common fields."""
        return {}

    def metrics_row(self, report: dict[str, Any], prefix: str) -> dict[str, float]:
        """The numbers of an evaluator's report as metrics.csv columns."""
        raise NotImplementedError

    def format_table(self, report: dict[str, Any], classes: Sequence[str]) -> str:
        """The per-class table ``segkit evaluate`` prints."""
        raise NotImplementedError

    def json_report(self, report: dict[str, Any]) -> dict[str, Any]:
        """The report as ``segkit evaluate --json`` writes it."""
        return report
