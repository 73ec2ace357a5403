"""PointRend mask head (Kirillov et al., "PointRend: Image Segmentation as Rendering", CVPR 2020).

torchvision's 28 x 28 mask head stays as the *coarse* predictor, so COCO weights load into everything
but the new part. A small point head (an MLP over fine-grained FPN features and the coarse logits at
the same points) then

* in training, predicts the mask at points chosen by uncertainty-biased sampling (oversample ``k``
  times, keep the ``beta`` share the coarse mask is least sure about, the rest uniformly at random),
  with a point-wise binary cross-entropy (``loss_mask_point``) next to torchvision's ``loss_mask``.
  The labels at the points are read from the annotation at the image's own resolution
  (:class:`FullResolutionTransform` keeps it), not from the copy resized to ``--img-size``: that is
  what lets the rendered mask be sharper than the model's input;
* at inference, renders the mask by adaptive subdivision: upsample the coarse logits 2x, recompute
  only the most uncertain points, repeat until ``resolution`` (224 by default), then torchvision's
  ``paste_masks_in_image`` pastes the square mask into the image as it does the 28 x 28 one.

Point coordinates are box-relative in [0, 1]^2 (x, y) unless named ``*_image``; sampling uses
``F.grid_sample`` with ``align_corners=False``, where pixel i covers [i, i + 1), as roi_align and
torchvision's mask paste do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss
from torchvision.models.detection.transform import GeneralizedRCNNTransform

MASK_HEADS = ("standard", "pointrend")
COARSE_SIZE = 28  # torchvision's mask head output: the coarse mask PointRend starts from
DEFAULT_RESOLUTION = 224  # 28 x 2^3: three subdivision steps
FINE_LEVEL = "0"  # the finest FPN level (stride 4): where the detail is


def check_resolution(resolution: int) -> int:
    """The number of 2x subdivision steps from 28 x 28 to ``resolution``; ``ValueError`` unless 28 x 2^k >= 112."""
    steps = round(math.log2(max(resolution, 1) / COARSE_SIZE))
    if resolution < 4 * COARSE_SIZE or COARSE_SIZE * 2 ** steps != resolution:
        raise ValueError(f"PointRend mask resolution must be 28 x 2^k and at least 112, got {resolution}; "
                         f"choose one of 112, 224, 448")
    return steps


def point_sample(features: Tensor, points: Tensor) -> Tensor:
    """Bilinear samples of ``features`` (N, C, H, W) at ``points`` (N, P, 2) in [0, 1]^2: (N, C, P)."""
    grid = 2.0 * points.unsqueeze(2).float() - 1.0  # (N, P, 1, 2) in grid_sample's [-1, 1]
    # in float32, as autocast would run it anyway: a half-precision grid is off by a fraction of a pixel
    return F.grid_sample(features.float(), grid, align_corners=False).squeeze(3)


def uncertainty(logits: Tensor) -> Tensor:
    """How unsure a logit is: highest (0) on the decision boundary, as in the paper."""
    return -logits.abs()


def uncertain_points(coarse: Tensor, num_points: int, oversample: float, importance: float) -> Tensor:
    """Training points (R, num_points, 2): ``importance`` of them the most uncertain of
    ``oversample * num_points`` random candidates, the rest uniformly random (the paper's k and beta).

    ``coarse``: (R, 1, h, w) logits of each RoI's class.
    """
    r = coarse.shape[0]
    candidates = torch.rand(r, int(oversample * num_points), 2, device=coarse.device)
    scores = uncertainty(point_sample(coarse.float(), candidates))[:, 0]  # (R, kN)
    num_uncertain = int(importance * num_points)
    top = scores.topk(num_uncertain, dim=1).indices
    chosen = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    random = torch.rand(r, num_points - num_uncertain, 2, device=coarse.device)
    return torch.cat([chosen, random], dim=1)


def boxes_to_image_points(boxes: Tensor, points: Tensor) -> Tensor:
    """Box-relative points (R, P, 2) to image coordinates, for boxes (R, 4) as x1, y1, x2, y2."""
    origin, size = boxes[:, None, :2], (boxes[:, None, 2:] - boxes[:, None, :2])
    return origin + points * size


def fine_grained_features(feature: Tensor, boxes: list[Tensor], points: Tensor,
                          image_shapes: list[tuple[int, int]]) -> Tensor:
    """FPN features (B, C, H, W) at each RoI's points: (R, C, P); ``boxes`` per image, RoIs in that order."""
    # The feature map covers the padded batch; its stride is a power of two, found as MultiScaleRoIAlign does.
    max_size = max(max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
    stride = 2.0 ** round(math.log2(max_size / max(feature.shape[-2:]))) if max_size else 1.0
    extent = torch.tensor([feature.shape[-1] * stride, feature.shape[-2] * stride], device=feature.device)
    out, start = [], 0
    for i, image_boxes in enumerate(boxes):
        n = len(image_boxes)
        image_points = boxes_to_image_points(image_boxes, points[start:start + n]) / extent  # (n, P, 2) in [0, 1]
        sampled = point_sample(feature[i:i + 1], image_points.reshape(1, -1, 2))  # (1, C, n * P)
        out.append(sampled.reshape(feature.shape[1], n, points.shape[1]).transpose(0, 1))
        start += n
    return torch.cat(out) if out else feature.new_zeros((0, feature.shape[1], points.shape[1]))


class FullResolutionTransform(GeneralizedRCNNTransform):
    """torchvision's resize and normalisation, which also keeps each target's masks as they came
    (``masks_full``, the same tensor: no copy) beside the resized ``masks``."""

    @classmethod
    def from_transform(cls, t: GeneralizedRCNNTransform) -> "FullResolutionTransform":
        return cls(t.min_size, t.max_size, t.image_mean, t.image_std, size_divisible=t.size_divisible,
                   fixed_size=t.fixed_size, _skip_resize=t._skip_resize)

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        if target is not None and "masks" in target:
            target["masks_full"] = target["masks"]  # the dict is the transform's own copy
        return super().resize(image, target)


class PointHead(nn.Module):
    """The paper's point head: an MLP (1x1 convs over points) on fine features plus the coarse logits,
    which are fed again to every layer; one logit per class and point."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 256, num_layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList()
        channels = in_channels + num_classes
        for _ in range(num_layers):
            self.layers.append(nn.Conv1d(channels, hidden, 1))
            channels = hidden + num_classes
        self.predictor = nn.Conv1d(channels, num_classes, 1)
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)  # starts by echoing nothing: the coarse mask rules
        nn.init.zeros_(self.predictor.bias)

    def forward(self, fine: Tensor, coarse: Tensor) -> Tensor:
        """``fine`` (R, C, P) and ``coarse`` (R, num_classes, P) to logits (R, num_classes, P)."""
        x = fine
        for layer in self.layers:
            x = F.relu(layer(torch.cat([x, coarse], dim=1)))
        return self.predictor(torch.cat([x, coarse], dim=1))


class PointRendRoIHeads(RoIHeads):
    """torchvision's RoIHeads with PointRend on the mask branch (boxes and coarse masks unchanged).

    Build it with :meth:`from_roi_heads` to keep every module and setting of an existing model.
    """

    def __init__(self, *args, point_head: PointHead, resolution: int = DEFAULT_RESOLUTION,
                 train_points: int = 14 * 14, oversample: float = 3.0, importance: float = 0.75,
                 subdivision_points: int = 28 * 28, **kwargs):
        super().__init__(*args, **kwargs)
        self.point_head = point_head
        self.steps = check_resolution(resolution)
        self.resolution = resolution
        self.train_points, self.oversample, self.importance = train_points, oversample, importance
        self.subdivision_points = subdivision_points  # per RoI and step, as in the paper (28 x 28)

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads, num_classes: int, resolution: int = DEFAULT_RESOLUTION,
                       **kwargs) -> "PointRendRoIHeads":
        """The same heads (the same module objects and settings) plus a new, randomly initialised point head."""
        fine_channels = heads.mask_predictor.conv5_mask.in_channels  # the FPN's width (256)
        return cls(heads.box_roi_pool, heads.box_head, heads.box_predictor,
                   heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
                   heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
                   heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                   mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor,
                   point_head=PointHead(fine_channels, num_classes), resolution=resolution, **kwargs)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """As :meth:`RoIHeads.forward` (boxes, then masks); training adds ``loss_mask_point``."""
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
            positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
            mask_boxes = [p[pos] for p, pos in zip(proposals, positive)]
            matched = [m[pos] for m, pos in zip(matched_idxs, positive)]
            losses.update(self._mask_losses(features, mask_boxes, matched, targets, image_shapes))
            return [], losses
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        masks = self._render_masks(features, boxes, labels, image_shapes)
        return [{"boxes": b, "labels": c, "scores": s, "masks": m}
                for b, c, s, m in zip(boxes, labels, scores, masks)], {}

    def _coarse_logits(self, features: dict[str, Tensor], boxes: list[Tensor],
                       image_shapes: list[tuple[int, int]]) -> Tensor:
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))

    def _mask_losses(self, features, boxes, matched, targets, image_shapes) -> dict[str, Tensor]:
        """torchvision's 28 x 28 mask loss, plus the point loss at uncertainty-biased points."""
        coarse = self._coarse_logits(features, boxes, image_shapes)
        gt_masks = [t["masks"] for t in targets]
        gt_labels = [t["labels"][m] for t, m in zip(targets, matched)]
        loss_mask = maskrcnn_loss(coarse, boxes, gt_masks, [t["labels"] for t in targets], matched)
        labels = torch.cat(gt_labels)
        rois = torch.arange(len(labels), device=labels.device)
        with torch.no_grad():  # where to look is chosen, not learned
            points = uncertain_points(coarse[rois, labels][:, None], self.train_points, self.oversample,
                                      self.importance)
        point_logits = self._point_logits(features, boxes, points, coarse, image_shapes)[rois, labels]
        full = [t.get("masks_full", t["masks"]) for t in targets]
        point_targets = point_labels(full, boxes, matched, points, image_shapes)
        if point_targets.numel() == 0:
            loss_point = point_logits.sum() * 0  # keeps every parameter in the graph (DDP)
        else:
            loss_point = F.binary_cross_entropy_with_logits(point_logits.float(), point_targets)
        return {"loss_mask": loss_mask, "loss_mask_point": loss_point}

    def _point_logits(self, features, boxes, points, coarse, image_shapes) -> Tensor:
        """Point head logits (R, num_classes, P) at box-relative ``points`` (R, P, 2)."""
        fine = fine_grained_features(features[FINE_LEVEL], boxes, points, image_shapes)
        coarse_at_points = point_sample(coarse, points)
        return self.point_head(fine, coarse_at_points)

    def _render_masks(self, features, boxes: list[Tensor], labels: list[Tensor],
                      image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """Mask probabilities (n, 1, resolution, resolution) per image, by adaptive subdivision."""
        coarse = self._coarse_logits(features, boxes, image_shapes)
        if coarse.shape[0] == 0:
            return [coarse.new_zeros((0, 1, self.resolution, self.resolution)) for _ in boxes]
        classes = torch.cat(labels)
        rois = torch.arange(len(classes), device=classes.device)
        mask = coarse[rois, classes][:, None].float()  # (R, 1, 28, 28) logits of each detection's class
        for _ in range(self.steps):
            mask = F.interpolate(mask, scale_factor=2, mode="bilinear", align_corners=False)
            r, _, h, w = mask.shape
            num = min(self.subdivision_points, h * w)
            index = uncertainty(mask).view(r, h * w).topk(num, dim=1).indices  # (R, num) cells to recompute
            points = torch.stack([(index % w + 0.5) / w, (index // w + 0.5) / h], dim=2)  # cell centres
            logits = self._point_logits(features, boxes, points, coarse, image_shapes)[rois, classes]
            mask = mask.view(r, h * w).scatter(1, index, logits.float()).view(r, 1, h, w)
        return list(mask.sigmoid().split([len(b) for b in boxes]))


def point_labels(gt_masks: list[Tensor], boxes: list[Tensor], matched: list[Tensor], points: Tensor,
                 image_shapes: list[tuple[int, int]]) -> Tensor:
    """Each RoI's matched ground-truth mask at its points: (R, P) of 0 and 1.

    ``gt_masks`` per image may have any resolution (the annotation's own, or resized): points are placed
    by their fraction of the model's image (``image_shapes``), and the mask pixel under each is read
    directly, without making float copies of large masks.
    """
    out, start = [], 0
    for masks, image_boxes, idx, (h, w) in zip(gt_masks, boxes, matched, image_shapes):
        n = len(image_boxes)
        fraction = boxes_to_image_points(image_boxes, points[start:start + n]) / points.new_tensor([w, h])
        mask_h, mask_w = masks.shape[-2:]
        x = (fraction[..., 0] * mask_w).long().clamp_(0, mask_w - 1)
        y = (fraction[..., 1] * mask_h).long().clamp_(0, mask_h - 1)
        out.append(masks[idx[:, None], y, x].float())
        start += n
    return torch.cat(out) if out else points.new_zeros((0, points.shape[1]))


def mask_head_of(model: nn.Module) -> dict:
    """What a checkpoint records about the mask head: ``{"mask_head": ...}`` (and PointRend's resolution)."""
    heads = model.roi_heads
    if isinstance(heads, PointRendRoIHeads):
        return {"mask_head": "pointrend", "mask_resolution": heads.resolution}
    return {"mask_head": "standard"}
