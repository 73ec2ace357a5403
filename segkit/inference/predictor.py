"""The one :class:`Predictor`: a trained model, loaded once, turning images into :class:`Prediction` s.

``segkit predict``, ``segkit evaluate``, the demo, training's preview images and the tests all run
their images through it.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads, expand_boxes, expand_masks, maskrcnn_inference
from torchvision.models.detection.transform import resize_boxes
from torchvision.transforms.functional import pil_to_tensor

from segkit.models.checkpoint import load_checkpoint, model_from_checkpoint, task_of
from segkit.inference.export import Runner
from segkit.data.images import ImageInput, as_rgb
from segkit.inference.masks import Crop, InstanceMasks
from segkit.models.pointrend import PointRendRoIHeads
from segkit.inference.prediction import Prediction, SemanticPrediction

# Convolutions in channels-last (NHWC) memory format, on the CPU, for models the Predictor builds
# itself: the same detections, and faster with oneDNN (bench/infer.py, README "Inference backends").
CPU_CHANNELS_LAST = True


class Predictor:
    """A trained Mask R-CNN, loaded once, ready to segment images.

    ``predictor(image)`` returns a :class:`Prediction`; ``predictor.model`` is the torchvision model.
    """

    task = "instance"  # what its checkpoint says; SemanticPredictor: "semantic"

    def __init__(self, model: torch.nn.Module | None, classes: list[str], score_threshold: float = 0.5,
                 device: str | torch.device | None = None, info: dict | None = None,
                 max_detections: int | None = None, runner: Runner | None = None):
        """``model`` is an eager torchvision Mask R-CNN; or None with ``runner``, an exported model's
        detector (see :func:`segkit.inference.export.load_runner`), which runs on the CPU."""
        if runner is not None:
            device = "cpu"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device) if model is not None else None
        self.runner = runner
        self.max_detections = max_detections
        if max_detections is not None and model is not None:
            # The mask head runs once per detection: on a CPU, torchvision's 100 cost seconds an image.
            self.model.roi_heads.detections_per_img = max_detections
        self.classes = list(classes)
        self.score_threshold = score_threshold
        self.info = info or {}  # what the checkpoint says about its training: metrics, image size, ...

    @property
    def score_floor(self) -> float:
        """The model's own score cut-off (torchvision's ``box_score_thresh``; frozen in an exported model)."""
        if self.model is not None:
            return float(self.model.roi_heads.score_thresh)
        return float(self.info["export"]["frozen"]["box_score_thresh"])

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        max_detections: int | None = None, channels_last: bool | None = None) -> "Predictor":
        """Build the model from a segkit checkpoint alone, or load an exported model (see below)."""
        return cls.from_loaded_checkpoint(load_checkpoint(path), path, device, max_detections, channels_last)

    @classmethod
    def from_loaded_checkpoint(cls, ckpt: dict, path: str | os.PathLike, device: str | torch.device | None = None,
                               max_detections: int | None = None,
                               channels_last: bool | None = None) -> "Predictor":
        """The same, from a checkpoint already read with :func:`segkit.models.checkpoint.load_checkpoint`.

        A semantic checkpoint (``task: "semantic"``) gives a :class:`SemanticPredictor`, whose
        predictions are :class:`segkit.inference.prediction.SemanticPrediction` s.

        An exported model (``.onnx``, ``.xml``, ``.torchscript``: what :func:`segkit.models.checkpoint.load_checkpoint`
        returns for it has an ``export`` entry) runs with its own backend. An eager model on the CPU
        runs in channels-last memory format unless ``channels_last`` is False (see :data:`CPU_CHANNELS_LAST`).
        """
        info = {"checkpoint": str(Path(path)), "arch": ckpt["arch"], "mask_head": ckpt.get("mask_head", "standard"),
                "img_size": ckpt["img_size"],
                "epoch": ckpt.get("epoch"), "metrics": ckpt.get("metrics", {})}
        if task_of(ckpt) == "semantic":
            return SemanticPredictor(model_from_checkpoint(ckpt), ckpt["classes"], ckpt.get("score_threshold", 0.5),
                                     device, {**info, "task": "semantic", "mask_head": None})
        if "export" in ckpt:
            from segkit.inference.export import load_runner

            return cls(None, ckpt["classes"], ckpt.get("score_threshold", 0.5), "cpu",
                       {**info, "export": ckpt["export"]}, max_detections, runner=load_runner(path, ckpt))
        predictor = cls(model_from_checkpoint(ckpt), ckpt["classes"], ckpt.get("score_threshold", 0.5), device,
                        info, max_detections)
        if channels_last is None:
            channels_last = CPU_CHANNELS_LAST and predictor.device.type == "cpu"
        if channels_last:
            predictor.model.to(memory_format=torch.channels_last)
            predictor.info["channels_last"] = True
        return predictor

    @classmethod
    def from_torchvision_coco(cls, device: str | torch.device | None = None,
                              max_detections: int | None = None) -> "Predictor":
        """torchvision's COCO-pretrained Mask R-CNN (91 COCO slots), when its weights are available."""
        from segkit.models.mask_rcnn import coco_pretrained

        model, classes = coco_pretrained()
        return cls(model, classes, 0.5, device, {"checkpoint": "torchvision COCO", "arch": "maskrcnn_resnet50_fpn"},
                   max_detections)

    @torch.inference_mode()
    def __call__(self, image: ImageInput, score_threshold: float | None = None) -> Prediction:
        return self.predict_batch([image], score_threshold)[0]

    @torch.inference_mode()
    def predict_batch(self, images: list[ImageInput], score_threshold: float | None = None) -> list[Prediction]:
        """Predict several images: in one forward pass (eager), or one by one (exported models)."""
        threshold = self.score_threshold if score_threshold is None else score_threshold
        tensors = image_tensors(images, self.device)
        if self.runner is not None:  # the score floor is frozen in the graph: filter afterwards
            outputs = [self._run_exported(t) for t in tensors]
            return [to_prediction(out, self.classes, threshold, t.shape[-2:]) for out, t in zip(outputs, tensors)]
        # The threshold goes with the call, not on the model: the demo and the ML backend share one
        # Predictor across threads. Detections under it get no mask computed.
        outputs = detect(self.model, tensors, threshold)
        return [to_prediction(out, self.classes, threshold, t.shape[-2:]) for out, t in zip(outputs, tensors)]

    def _run_exported(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        boxes, labels, scores, mask_probs = self.runner(image)
        n = len(scores) if self.max_detections is None else self.max_detections  # sorted by score
        return {"boxes": boxes[:n], "labels": labels[:n].to(torch.int64), "scores": scores[:n],
                "mask_probs": mask_probs[:n]}


class SemanticPredictor(Predictor):
    """A trained semantic model (:mod:`segkit.models.semantic`): ``predictor(image)`` returns a
    :class:`SemanticPrediction`, one class per pixel at the image's own size.

    Built by :meth:`Predictor.from_checkpoint` for a semantic checkpoint. The score threshold is
    accepted for the callers' sake and ignored: every pixel gets its most probable class.
    """

    task = "semantic"

    def __init__(self, model: torch.nn.Module, classes: list[str], score_threshold: float = 0.5,
                 device: str | torch.device | None = None, info: dict | None = None,
                 max_detections: int | None = None):
        super().__init__(None, classes, score_threshold, device, info)
        self.model = model.eval().to(self.device)

    @property
    def score_floor(self) -> float:
        return 0.0

    @torch.inference_mode()
    def predict_batch(self, images: list[ImageInput], score_threshold: float | None = None) -> list[SemanticPrediction]:
        """Class maps of several images, each from its own forward (see ``SemanticSegmenter.forward``)."""
        from segkit.engine.semantic import predict_maps

        maps = predict_maps(self.model, image_tensors(images, self.device))
        return [SemanticPrediction(m, self.classes, conf) for m, conf in maps]


def image_tensors(images: list[ImageInput], device: torch.device) -> list[torch.Tensor]:
    """Images as the models take them: float (3, H, W) in 0..1 on ``device``."""
    return [pil_to_tensor(as_rgb(im)).to(device, non_blocking=True).float().div_(255) for im in images]


def detect(model: torch.nn.Module, images: list[torch.Tensor],
           score_threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
    """A torchvision Mask R-CNN in eval mode, stopped before it pastes masks into full-size images.

    Per image: ``boxes`` (N, 4) in the input image's pixels, ``labels``, ``scores`` and
    ``mask_probs`` (N, 1, M, M), the mask head's probabilities over each box (M: 28, or PointRend's
    resolution). The same steps as ``model(images)`` (transform, backbone, RPN, heads, boxes scaled
    back), less the paste, whose float image per detection is what makes a large photo cost gigabytes.

    ``score_threshold`` drops the detections scoring under it before the mask head runs (None: keep
    all that pass the model's own floor). Nothing on the model is changed, so threads can share it.
    """
    original_sizes = [tuple(im.shape[-2:]) for im in images]
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    proposals, _ = model.rpn(batch, features)
    heads = model.roi_heads
    boxes, scores, labels = box_detections(heads, features, proposals, batch.image_sizes, score_threshold)
    masks = mask_probs(heads, features, boxes, labels, batch.image_sizes)
    return [{"boxes": resize_boxes(b, size, original), "labels": c, "scores": s, "mask_probs": m}
            for b, c, s, m, size, original in zip(boxes, labels, scores, masks, batch.image_sizes, original_sizes)]


def box_detections(heads: RoIHeads, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                   image_sizes: list[tuple[int, int]], score_threshold: float | None = None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Boxes, scores and labels per image, as ``heads`` (eval mode) finds them, less those scoring
    under ``score_threshold``.

    The same detections as torchvision's with its floor raised to the threshold: NMS keeps them sorted
    by score, and one below the threshold only suppresses others below it, so cutting afterwards
    drops the same ones without writing the threshold on the shared model.
    """
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    found = heads.postprocess_detections(class_logits, box_regression, proposals, image_sizes)
    if score_threshold is None:
        return found
    keep = [scores >= score_threshold for scores in found[1]]
    return tuple([t[k] for t, k in zip(per_image, keep)] for per_image in found)


def mask_probs(heads: RoIHeads, features: dict[str, torch.Tensor], boxes: list[torch.Tensor],
               labels: list[torch.Tensor], image_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Each detection's mask probabilities over its box, per image: PointRend's rendered masks, or
    torchvision's 28 x 28 ones for the detection's class."""
    if isinstance(heads, PointRendRoIHeads):
        return heads._render_masks(features, boxes, labels, image_sizes)
    logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, boxes, image_sizes)))
    return maskrcnn_inference(logits, labels)


def paste_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> InstanceMasks:
    """Each (M, M) mask probability map resized onto its box and cut at 0.5, kept at the box's size.

    Pixel for pixel what torchvision's ``paste_masks_in_image`` (then ``> 0.5``) gives inside the
    image, without the full-size image per mask: the mask is padded by one cell and its box grown
    to match, the box rounded down to integers, the mask resized bilinearly to the box, and the
    part of the box inside the image kept.
    """
    padded, scale = expand_masks(mask_probs, padding=1)
    int_boxes = expand_boxes(boxes, scale).to(torch.int64).tolist()
    crops = []
    for mask, (bx0, by0, bx1, by1) in zip(padded, int_boxes):
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        x0, x1, y0, y1 = max(bx0, 0), min(bx1 + 1, width), max(by0, 0), min(by1 + 1, height)
        region = resized[y0 - by0:max(y1, y0) - by0, x0 - bx0:max(x1, x0) - bx0]
        crops.append(Crop(x0, y0, (region > 0.5).cpu().numpy()))
    return InstanceMasks(crops, height, width)


def to_prediction(output: dict[str, torch.Tensor], classes: list[str], threshold: float,
                  size: tuple[int, int]) -> Prediction:
    """One image's output of :func:`detect` as a :class:`Prediction`.

    Keeps the detections scoring at least ``threshold`` and pastes only their masks; masks are the
    model's soft masks cut at 0.5, as torchvision and Detectron2 do. ``size`` is the image's
    (height, width).
    """
    keep = output["scores"] >= threshold
    labels = output["labels"][keep].cpu().numpy().astype(np.int64)
    boxes = output["boxes"][keep]
    masks = paste_masks(output["mask_probs"][keep], boxes, int(size[0]), int(size[1]))
    return Prediction(boxes=boxes.cpu().numpy().astype(np.float32), labels=labels,
                      class_names=[classes[i - 1] for i in labels],
                      scores=output["scores"][keep].cpu().numpy().astype(np.float32), masks=masks)
