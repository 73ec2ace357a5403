"""Instance segmentation (the default ``--task``): torchvision's Mask R-CNN, COCO AP, polygons."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from segkit.data.dataset import SegmentationDataset
from segkit.data.records import ImageRecord
from segkit.evaluation import metrics
from segkit.evaluation.coco import records_to_coco
from segkit.models.forward import detect, to_prediction
from segkit.structures.prediction import Prediction
from segkit.models.mask_rcnn import (ARCHITECTURES, DEFAULT_TRAINABLE_LAYERS, build_model, freeze_backbone,
                                     is_pretrained, starting_weights, uses_frozen_bn)
from segkit.models.pointrend import mask_head_of
from segkit.tasks.base import Task


class InstanceTask(Task):
    """Objects, each with a class, a score, a box and a mask."""

    name = "instance"
    architectures = ARCHITECTURES
    default_model = "maskrcnn_resnet50_fpn"
    score_key = "val_segm_map"
    report_key = "ap"
    region = "polygon"
    channels_last = True  # the same detections, faster with oneDNN (bench/infer.py)
    has_pr_curves = True
    prediction = Prediction
    csv_columns = ("epoch", "train_loss", "val_loss", "val_bbox_map", "val_segm_map", "val_segm_map50", "lr", "seconds")

    def curve_keys(self, history: Sequence[dict]) -> list[str]:
        return ["val_bbox_map", "val_bbox_map50", "val_segm_map", "val_segm_map50", "val_segm_map75"]

    def build_model(self, cfg: Any, classes: list[str], resumed: bool) -> nn.Module:
        model = build_model(cfg.model, len(classes) + 1, None if resumed else cfg.weights, cfg.trainable_layers,
                            cfg.img_size, frozen_bn=uses_frozen_bn(cfg.model, cfg.weights), mask_head=cfg.mask_head,
                            mask_resolution=cfg.mask_resolution, classes=classes)
        if resumed and is_pretrained(cfg.weights):  # the same frozen stages as the run had
            freeze_backbone(model, DEFAULT_TRAINABLE_LAYERS if cfg.trainable_layers is None else cfg.trainable_layers)
        if cfg.roi_batch_size is not None:  # else the architecture's own (training-time sampling only)
            model.roi_heads.fg_bg_sampler.batch_size_per_image = cfg.roi_batch_size
        return model

    def starting_weights(self, cfg: Any) -> dict[str, str]:
        return starting_weights(cfg.model, cfg.weights)

    def model_from_checkpoint(self, ckpt: dict[str, Any]) -> nn.Module:
        # checkpoints from before PointRend have no mask_head: they are "standard"
        head = {"mask_head": ckpt.get("mask_head", "standard")}
        if "mask_resolution" in ckpt:
            head["mask_resolution"] = int(ckpt["mask_resolution"])
        model = build_model(ckpt["arch"], num_classes=len(ckpt["classes"]) + 1, weights=None,
                            img_size=ckpt["img_size"], frozen_bn=bool(ckpt.get("frozen_bn", False)), **head)
        model.load_state_dict(ckpt["model"])
        return model

    def checkpoint_fields(self, model: nn.Module) -> dict[str, Any]:
        return mask_head_of(model)  # which head to rebuild; lets an exporter refuse what it cannot run

    def frozen_bn(self, cfg: Any) -> bool:
        return uses_frozen_bn(cfg.model, cfg.weights)

    def dataset(self, images: Sequence[ImageRecord], classes: Sequence[str], transform,
                tile: int | None = None) -> SegmentationDataset:
        return SegmentationDataset(images, classes, transform, tile)

    def loader_options(self, cfg: Any, train: bool, n_images: int, world: int) -> dict[str, Any]:
        # val/test go one image per forward, as torchvision's references evaluate: padding a batch to a
        # common size moves detections, and evaluate, predict and the demo see each image alone
        return {"batch_size": cfg.batch_size if train else 1, "drop_last": False}

    def ground_truth(self, images: Sequence[ImageRecord], classes: Sequence[str]) -> dict:
        return records_to_coco(images, classes)  # decoding every mask once, not every epoch

    def evaluator(self, images: Sequence[ImageRecord], classes: Sequence[str], threshold: float,
                  ground_truth: dict | None = None) -> metrics.SegmentationEvaluator:
        return metrics.SegmentationEvaluator(images, classes, threshold, ground_truth)

    def predict(self, model: nn.Module, images: list[torch.Tensor], classes: list[str],
                threshold: float, size: int | None = None) -> list[Prediction]:
        # the threshold and the size go with the call, not on the model: threads share one model
        outputs = detect(model, images, threshold, size)
        return [to_prediction(out, classes, threshold, image.shape[-2:]) for out, image in zip(outputs, images)]

    def score_floor(self, model: nn.Module) -> float:
        return float(model.roi_heads.score_thresh)

    def cap_detections(self, model: nn.Module, n: int) -> None:
        model.roi_heads.detections_per_img = n  # the mask head runs once per detection

    def describe(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        return {"mask_head": ckpt.get("mask_head", "standard")}

    def metrics_row(self, report: dict[str, Any], prefix: str) -> dict[str, float]:
        row = {f"{prefix}_{t}_map{key[2:]}": report[t][key] for t in ("bbox", "segm") for key in ("AP", "AP50", "AP75")}
        for key in ("mIoU", "mDice"):  # None when no class has pixels in the ground truth or the predictions
            value = report["semantic"][key]
            row[f"{prefix}_{key.lower()}"] = float("nan") if value is None else value
        boundary = report["boundary"]["iou"]
        row[f"{prefix}_biou"] = float("nan") if boundary is None else boundary
        row.update({f"{prefix}_{t}_ap_{name}": v for t in ("bbox", "segm") for name, v in report[t]["per_class"].items()})
        return row

    def format_table(self, report: dict[str, Any], classes: Sequence[str]) -> str:
        return metrics.format_table(report, classes)
