"""The model's forward pass at inference, below every caller: images in, detections (or class maps) out.

:class:`segkit.inference.predictor.Predictor`, training's evaluation (:mod:`segkit.engine.loops`), the
interactive prompts and the exporter share these steps, so that they agree pixel for pixel.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads, expand_boxes, expand_masks, maskrcnn_inference
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.transforms.functional import pil_to_tensor

from segkit.data.images import ImageInput, as_rgb
from segkit.structures.masks import Crop, InstanceMasks
from segkit.structures.prediction import Prediction
from segkit.models.pointrend import PointRendRoIHeads


def image_tensors(images: list[ImageInput], device: torch.device) -> list[torch.Tensor]:
    """Images as the models take them: float (3, H, W) in 0..1 on ``device``."""
    return [pil_to_tensor(as_rgb(im)).to(device, non_blocking=True).float().div_(255) for im in images]


def detect(model: torch.nn.Module, images: list[torch.Tensor], score_threshold: float | None = None,
           size: int | None = None) -> list[dict[str, torch.Tensor]]:
    """A torchvision Mask R-CNN in eval mode, stopped before it pastes masks into full-size images.

    Per image: ``boxes`` (N, 4) in the input image's pixels, ``labels``, ``scores`` and
    ``mask_probs`` (N, 1, M, M), the mask head's probabilities over each box (M: 28, or PointRend's
    resolution). The same steps as ``model(images)`` (transform, backbone, RPN, heads, boxes scaled
    back), less the paste, whose float image per detection is what makes a large photo cost gigabytes.

    ``score_threshold`` drops the detections scoring under it before the mask head runs (None: keep
    all that pass the model's own floor). ``size`` resizes the images' shorter side to it instead of the
    model's own size (test-time scales). Nothing on the model is changed, so threads can share it.
    """
    original_sizes = [tuple(im.shape[-2:]) for im in images]
    batch, _ = (model.transform if size is None else resized_transform(model.transform, size))(images)
    features = model.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    proposals, _ = model.rpn(batch, features)
    heads = model.roi_heads
    boxes, scores, labels = box_detections(heads, features, proposals, batch.image_sizes, score_threshold)
    masks = mask_probs(heads, features, boxes, labels, batch.image_sizes)
    return [{"boxes": resize_boxes(b, size, original), "labels": c, "scores": s, "mask_probs": m}
            for b, c, s, m, size, original in zip(boxes, labels, scores, masks, batch.image_sizes, original_sizes)]


def resized_transform(transform: GeneralizedRCNNTransform, size: int) -> GeneralizedRCNNTransform:
    """A copy of a model's input transform that resizes to ``size`` (shorter side; the longer side's cap scaled
    alike), for one call: the model's own transform stays as it is."""
    scale = size / transform.min_size[-1]
    return GeneralizedRCNNTransform(size, round(transform.max_size * scale), transform.image_mean, transform.image_std,
                                    size_divisible=transform.size_divisible, fixed_size=transform.fixed_size).eval()


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


@torch.inference_mode()
def predict_maps(model: torch.nn.Module, images: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(class map (H, W) uint8, mean confidence per label 0..C) of each image, from a semantic model in eval mode."""
    results = []
    for logits in model(images):
        probs, labels = logits.float().softmax(0).max(0)
        n = logits.shape[0]
        counts = torch.bincount(labels.ravel(), minlength=n)
        sums = torch.bincount(labels.ravel(), weights=probs.ravel(), minlength=n)
        confidence = torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)
        results.append((labels.to(torch.uint8).cpu().numpy(), confidence.cpu().numpy()))
    return results
