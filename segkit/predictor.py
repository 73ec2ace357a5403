"""The one :class:`Predictor`: a trained model, loaded once, turning images into :class:`Prediction` s.

``segkit predict``, ``segkit evaluate``, the demo, training's preview images and the tests all run
their images through it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.functional import pil_to_tensor

from segkit.checkpoint import load_checkpoint, model_from_checkpoint
from segkit.images import ImageInput, as_rgb
from segkit.prediction import Prediction


class Predictor:
    """A trained Mask R-CNN, loaded once, ready to segment images.

    ``predictor(image)`` returns a :class:`Prediction`; ``predictor.model`` is the torchvision model.
    """

    def __init__(self, model: torch.nn.Module, classes: list[str], score_threshold: float = 0.5,
                 device: str | torch.device | None = None, info: dict | None = None,
                 max_detections: int | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        if max_detections is not None:
            # The mask head runs once per detection: on a CPU, torchvision's 100 cost seconds an image.
            self.model.roi_heads.detections_per_img = max_detections
        self.classes = list(classes)
        self.score_threshold = score_threshold
        self.info = info or {}  # what the checkpoint says about its training: metrics, image size, ...

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        max_detections: int | None = None) -> "Predictor":
        """Build the model from a segkit checkpoint alone."""
        return cls.from_loaded_checkpoint(load_checkpoint(path), path, device, max_detections)

    @classmethod
    def from_loaded_checkpoint(cls, ckpt: dict, path: str | os.PathLike, device: str | torch.device | None = None,
                               max_detections: int | None = None) -> "Predictor":
        """The same, from a checkpoint already read with :func:`segkit.checkpoint.load_checkpoint`."""
        info = {"checkpoint": str(Path(path)), "arch": ckpt["arch"], "mask_head": ckpt.get("mask_head", "standard"),
                "img_size": ckpt["img_size"],
                "epoch": ckpt.get("epoch"), "metrics": ckpt.get("metrics", {})}
        return cls(model_from_checkpoint(ckpt), ckpt["classes"], ckpt.get("score_threshold", 0.5), device, info,
                   max_detections)

    @classmethod
    def from_torchvision_coco(cls, device: str | torch.device | None = None,
                              max_detections: int | None = None) -> "Predictor":
        """torchvision's COCO-pretrained Mask R-CNN (91 COCO slots), when its weights are available."""
        from segkit.model import coco_pretrained

        model, classes = coco_pretrained()
        return cls(model, classes, 0.5, device, {"checkpoint": "torchvision COCO", "arch": "maskrcnn_resnet50_fpn"},
                   max_detections)

    @torch.inference_mode()
    def __call__(self, image: ImageInput, score_threshold: float | None = None) -> Prediction:
        return self.predict_batch([image], score_threshold)[0]

    @torch.inference_mode()
    def predict_batch(self, images: list[ImageInput], score_threshold: float | None = None) -> list[Prediction]:
        """Predict several images in one forward pass."""
        threshold = self.score_threshold if score_threshold is None else score_threshold
        tensors = [pil_to_tensor(as_rgb(im)).to(self.device, non_blocking=True).float().div_(255)
                   for im in images]
        # torchvision runs the mask head on, and pastes a full-size mask for, every detection above
        # its own floor (0.05). Raising the floor to our threshold skips the masks we would discard;
        # the detections kept are the same, since one below the threshold only suppresses (in NMS)
        # others below it.
        heads = self.model.roi_heads
        floor = heads.score_thresh
        heads.score_thresh = max(floor, threshold)
        try:
            outputs = self.model(tensors)
        finally:
            heads.score_thresh = floor
        return [to_prediction(out, self.classes, threshold, t.shape[-2:]) for out, t in zip(outputs, tensors)]


def to_prediction(output: dict[str, torch.Tensor], classes: list[str], threshold: float,
                  size: tuple[int, int]) -> Prediction:
    """One image's output of a torchvision Mask R-CNN in eval mode as a :class:`Prediction`.

    Keeps the detections scoring at least ``threshold``; masks are the model's soft masks cut at 0.5,
    as torchvision and Detectron2 do. ``size`` is the image's (height, width), for an empty result.
    """
    keep = output["scores"] >= threshold
    labels = output["labels"][keep].cpu().numpy().astype(np.int64)
    masks = output["masks"][keep]
    masks = (masks[:, 0] > 0.5).cpu().numpy() if len(masks) else np.zeros((0, *size), dtype=bool)
    return Prediction(boxes=output["boxes"][keep].cpu().numpy().astype(np.float32), labels=labels,
                      class_names=[classes[i - 1] for i in labels],
                      scores=output["scores"][keep].cpu().numpy().astype(np.float32), masks=masks)
