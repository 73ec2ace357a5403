"""Semantic segmentation models (``--task semantic``): an explicit table of builders, starting weights,
and :class:`SemanticSegmenter`, the wrapper that gives them Mask R-CNN's calling convention.

Like torchvision's detection models, the wrapper takes a list of float images in [0, 1] of any size
and does its own resize and normalisation: ``model(images, targets)`` returns a dict of losses (so
segkit's training loop, AMP, DDP and validation losses work unchanged), ``model(images)`` returns
one (C + 1, H, W) logit map per image, at the image's own size.

* ``unet_resnet18`` / ``unet_resnet34``: segmentation-models-pytorch's U-Net with a ResNet encoder;
  ``--weights coco`` means the encoder's ImageNet weights (there are no COCO ones), the decoder starts
  from random init.
* ``deeplabv3_resnet50`` / ``lraspp_mobilenet_v3_large``: torchvision's, with its COCO weights (trained
  on the 20 Pascal VOC classes); the classifier is replaced for the user's classes and DeepLabV3's
  auxiliary classifier is dropped.
"""
from __future__ import annotations

import os
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segkit.data.class_map import IGNORE_INDEX
from segkit.models.mask_rcnn import WeightsError, _load_or_explain, is_pretrained, match_class_rows, read_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDE = 32  # the encoders downsample 32x: padded sizes are multiples of this
LOSSES = ("ce+dice", "ce", "dice")


def _unet(encoder: str):
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        import segmentation_models_pytorch as smp  # imported here: it pulls in timm (seconds)

        def make():
            return smp.Unet(encoder, encoder_weights="imagenet" if pretrained else None, classes=num_classes)
        if not pretrained:
            return make()
        return _load_or_explain(make, _smp_source(encoder), target=_hf_target(encoder))
    return build


def _deeplabv3(num_classes: int, pretrained: bool) -> nn.Module:
    from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights, deeplabv3_resnet50

    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
    if pretrained:
        _load_torchvision(model, DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1)
    model.classifier[4] = nn.Conv2d(model.classifier[4].in_channels, num_classes, 1)
    return model


def _lraspp(num_classes: int, pretrained: bool) -> nn.Module:
    from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights, lraspp_mobilenet_v3_large

    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    if pretrained:
        _load_torchvision(model, LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1)
    head = model.classifier
    head.low_classifier = nn.Conv2d(head.low_classifier.in_channels, num_classes, 1)
    head.high_classifier = nn.Conv2d(head.high_classifier.in_channels, num_classes, 1)
    return model


# name -> (builder(num_classes, pretrained), state-dict prefixes of the per-class head)
SEMANTIC_ARCHITECTURES = {
    "unet_resnet34": (_unet("resnet34"), ("segmentation_head.",)),
    "unet_resnet18": (_unet("resnet18"), ("segmentation_head.",)),
    "deeplabv3_resnet50": (_deeplabv3, ("classifier.4.",)),
    "lraspp_mobilenet_v3_large": (_lraspp, ("classifier.low_classifier.", "classifier.high_classifier.")),
}
DEFAULT_SEMANTIC_MODEL = "unet_resnet34"


def _smp_source(encoder: str):
    import segmentation_models_pytorch.encoders as smp_encoders

    settings = smp_encoders.encoders[encoder]["pretrained_settings"]["imagenet"]
    url = f"https://huggingface.co/{settings['repo_id']}/resolve/{settings['revision']}/model.safetensors"
    return types.SimpleNamespace(url=url)  # what _load_or_explain names in its message


def _hf_target(encoder: str) -> str:
    return (f"$HF_HOME/hub, Hugging Face's cache (easiest: run huggingface_hub.hf_hub_download("
            f"'smp-hub/{encoder}.imagenet', f) for f in 'config.json' and 'model.safetensors' there, "
            "then copy the cache over)")


def _load_torchvision(model: nn.Module, weights) -> None:
    state = _load_or_explain(lambda: weights.get_state_dict(progress=True, check_hash=True), weights)
    state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}  # dropped: no aux loss
    model.load_state_dict(state)


def build_semantic_model(arch: str, num_classes: int, weights: str | os.PathLike | None = "coco",
                         img_size: int = 512, loss: str = "ce+dice",
                         classes: list[str] | None = None) -> SemanticSegmenter:
    """A semantic model for ``num_classes`` classes plus background (index 0), wrapped in :class:`SemanticSegmenter`.

    ``weights``: ``"coco"`` (pretrained as the module docstring says; offline, a
    :class:`segkit.models.mask_rcnn.WeightsError` says where to put the file), ``None``/``"none"`` (random init),
    or a path to a segkit checkpoint or state dict of the same architecture. Its per-class head is
    kept row by row for the classes a checkpoint shares with ``classes`` (names, without the
    background), matched by name; without names, whole when the class count matches; else started anew.
    """
    if arch not in SEMANTIC_ARCHITECTURES:
        raise ValueError(f"unknown semantic model {arch!r}; choose one of: {', '.join(SEMANTIC_ARCHITECTURES)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
    if str(weights).lower() == "imagenet":
        raise WeightsError("--weights imagenet is for instance models; a semantic model's --weights coco already "
                           "starts from ImageNet (U-Net's encoder) or COCO (torchvision's DeepLabV3, LR-ASPP)")
    builder, head = SEMANTIC_ARCHITECTURES[arch]
    word = is_pretrained(weights) and str(weights).lower() == "coco"
    net = builder(num_classes, word)
    if is_pretrained(weights) and not word:
        _load_path(net, arch, Path(weights), head, classes)
    return SemanticSegmenter(net, num_classes, img_size, loss)


def _load_path(net: nn.Module, arch: str, path: Path, head: tuple[str, ...], classes: list[str] | None) -> None:
    """Weights from a file: everything must fit except the per-class head, which may have another class count."""
    state, file_classes = read_weights(path)
    state = {k.removeprefix("net."): v for k, v in state.items()}  # a segkit checkpoint wraps the network
    own = net.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in fitting and not k.startswith(head)]
    if missing:
        raise WeightsError(f"{path}: not a {arch} state dict ({len(missing)} of its tensors missing or of "
                           f"another shape, e.g. {missing[:3]})")
    if file_classes is not None and classes is not None:  # one row per class (0: background), matched by name
        per_class = {k: 1 for k, v in state.items() if k.startswith(head) and k in own and v.dim()
                     and v.shape[0] == len(file_classes) + 1 and own[k].shape[0] == len(classes) + 1}
        fitting.update(match_class_rows(state, own, per_class, file_classes, classes))
    net.load_state_dict(fitting, strict=False)


class SemanticSegmenter(nn.Module):
    """A segmentation network with its own resize, normalisation, padding and losses (see the module docstring).

    Each image is resized so that its shorter side is ``img_size`` (the longer one capped in
    torchvision's 800:1333 ratio, as for Mask R-CNN), normalised with ImageNet statistics, and the
    batch padded to a multiple of 32; padding is ignored by the loss.
    """

    def __init__(self, net: nn.Module, num_classes: int, img_size: int, loss: str = "ce+dice"):
        super().__init__()
        self.net, self.num_classes, self.img_size, self.loss = net, num_classes, img_size, loss
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        self._dice = None

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """Losses ``{"loss_ce", "loss_dice"}`` when ``targets`` (each with ``"semantic"``, (H, W) int64) are
        given, else a list of (C + 1, H, W) logits at each image's own size."""
        if targets is None and len(images) > 1:
            # One at a time: the padding a batch needs would change each image's logits near its edges,
            # and an image's prediction must not depend on what it was batched with.
            return [self([im])[0] for im in images]
        sizes = [self._resized(im.shape[-2:]) for im in images]
        batch = self._batch([F.interpolate(((im - self.mean) / self.std)[None], size=s, mode="bilinear",
                                           align_corners=False)[0] for im, s in zip(images, sizes)], 0.0)
        logits = self._logits(batch)
        if targets is not None:
            target = self._batch([F.interpolate(t["semantic"][None, None].float(), size=s, mode="nearest")[0, 0]
                                  for t, s in zip(targets, sizes)], float(IGNORE_INDEX)).long()
            return self._losses(logits, target)
        return [F.interpolate(logits[i:i + 1, :, :h, :w], size=tuple(im.shape[-2:]), mode="bilinear",
                              align_corners=False)[0] for i, (im, (h, w)) in enumerate(zip(images, sizes))]

    def _resized(self, size) -> tuple[int, int]:
        h, w = int(size[0]), int(size[1])
        scale = min(self.img_size / min(h, w), round(self.img_size * 1333 / 800) / max(h, w))
        return max(1, round(h * scale)), max(1, round(w * scale))

    def _batch(self, tensors: list[torch.Tensor], fill: float) -> torch.Tensor:
        h = -(-max(t.shape[-2] for t in tensors) // STRIDE) * STRIDE
        w = -(-max(t.shape[-1] for t in tensors) // STRIDE) * STRIDE
        return torch.stack([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=fill) for t in tensors])

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.net(batch)
        return out["out"] if isinstance(out, dict) else out  # torchvision's models return {"out": ...}

    def _losses(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if not (target != IGNORE_INDEX).any():  # nothing to learn from (all padding or ignore): 0, not NaN
            return {f"loss_{name}": logits.sum() * 0.0 for name in self.loss.split("+")}
        losses = {}
        if "ce" in self.loss:
            losses["loss_ce"] = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
        if "dice" in self.loss:
            if self._dice is None:
                from segmentation_models_pytorch.losses import DiceLoss

                self._dice = DiceLoss("multiclass", ignore_index=IGNORE_INDEX)
            losses["loss_dice"] = self._dice(logits.float(), target)
        return losses
