"""Semantic segmentation (``--task semantic``): one class per pixel, IoU and Dice, brush regions."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from segkit.data.dataset import SemanticDataset
from segkit.data.records import ImageRecord
from segkit.evaluation import semantic_metrics
from segkit.models.forward import predict_maps
from segkit.structures.prediction import SemanticPrediction
from segkit.models.semantic import DEFAULT_SEMANTIC_MODEL, SEMANTIC_ARCHITECTURES, build_semantic_model
from segkit.tasks.base import Task


class SemanticTask(Task):
    """Every pixel's most probable class; touching objects of one class are one region."""

    name = "semantic"
    architectures = SEMANTIC_ARCHITECTURES
    default_model = DEFAULT_SEMANTIC_MODEL
    score_key = "val_miou"
    report_key = "semantic"
    region = "brush"  # a class's area is one region, often in pieces: a brush keeps it whole
    prediction = SemanticPrediction
    has_scores = False  # every pixel gets its most probable class
    csv_columns = ("epoch", "train_loss", "val_loss", "lr", "seconds")

    def curve_keys(self, history: Sequence[dict]) -> list[str]:
        per_class = sorted({k for row in history for k in row if k.startswith("val_iou_")})
        return ["val_miou", "val_mdice", "val_pixel_accuracy", *per_class]

    def build_model(self, cfg: Any, classes: list[str], resumed: bool) -> nn.Module:
        # every layer trains: --trainable-layers is Mask R-CNN's
        return build_semantic_model(cfg.model, len(classes) + 1, None if resumed else cfg.weights, cfg.img_size,
                                    cfg.loss, classes=classes)

    def model_from_checkpoint(self, ckpt: dict[str, Any]) -> nn.Module:
        model = build_semantic_model(ckpt["arch"], len(ckpt["classes"]) + 1, weights=None, img_size=ckpt["img_size"],
                                     loss=(ckpt.get("config") or {}).get("loss") or "ce+dice")
        model.load_state_dict(ckpt["model"])
        return model

    def dataset(self, images: Sequence[ImageRecord], classes: Sequence[str], transform,
                tile: int | None = None) -> SemanticDataset:
        if tile is not None:
            raise ValueError("tiled training is for instance models")
        return SemanticDataset(images, classes, transform)

    def loader_options(self, cfg: Any, train: bool, n_images: int, world: int) -> dict[str, Any]:
        # a last batch of one image would stop batch norm over 1x1 features (DeepLabV3's image pooling)
        return {"batch_size": cfg.batch_size, "drop_last": train and n_images > cfg.batch_size * world}

    def evaluator(self, images: Sequence[ImageRecord], classes: Sequence[str], threshold: float,
                  ground_truth: Any = None) -> semantic_metrics.SemanticEvaluator:
        return semantic_metrics.SemanticEvaluator(classes, images)

    def predict(self, model: nn.Module, images: list[torch.Tensor], classes: list[str],
                threshold: float, size: int | None = None) -> list[SemanticPrediction]:
        if size is not None:
            raise ValueError("test-time scales are for instance models; this one is semantic")
        # no scores to cut: the threshold is accepted for the callers' sake
        return [SemanticPrediction(m, classes, conf) for m, conf in predict_maps(model, images)]

    def describe(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        return {"mask_head": None}

    def metrics_row(self, report: dict[str, Any], prefix: str) -> dict[str, float]:
        return semantic_metrics.metrics_row(report, prefix)

    def format_table(self, report: dict[str, Any], classes: Sequence[str]) -> str:
        return semantic_metrics.format_table(report, classes)

    def json_report(self, report: dict[str, Any]) -> dict[str, Any]:
        return {"semantic": report}  # the key the instance report keeps its pixel metrics under
