"""Build Mask R-CNN from an explicit table of architectures and load its starting weights.

Transfer learning the torchvision way: build the architecture exactly as torchvision does for
pretrained weights (frozen batch norm, frozen early backbone stages), load the COCO state dict
(91 classes), then replace the box and mask predictors with fresh ones for the user's classes.
With ``mask_head="pointrend"`` a PointRend point head (:mod:`segkit.models.pointrend`, random init) is
added on top of the 28 x 28 mask head, which stays as its coarse predictor.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import ResNet101_Weights, resnet50, resnet101
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import misc as misc_nn_ops

from segkit.models.pointrend import (DEFAULT_RESOLUTION, MASK_HEADS, FullResolutionTransform, PointRendRoIHeads,
                              check_resolution)
from segkit.data.records import class_key

COCO_CLASSES = 91  # torchvision's COCO heads, background and "N/A" slots included


class WeightsError(RuntimeError):
    """Starting weights could not be found or loaded; the message says what to do instead."""


def _r50_v1(norm: type[nn.Module], imagenet: bool, **kwargs) -> MaskRCNN:
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=norm), trainable_layers=5)
    return MaskRCNN(backbone, num_classes=COCO_CLASSES, **kwargs)


def _r50_v2(norm: type[nn.Module], imagenet: bool, **kwargs) -> MaskRCNN:
    # torchvision's v2 recipe uses plain BatchNorm everywhere; its builder is the one place that knows it.
    return tv_mask_rcnn.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=COCO_CLASSES, **kwargs)


def _r101(norm: type[nn.Module], imagenet: bool, **kwargs) -> MaskRCNN:
    # torchvision has no COCO weights for this one: "coco" means an ImageNet backbone.
    weights = ResNet101_Weights.IMAGENET1K_V2 if imagenet else None
    body = _load_or_explain(lambda: resnet101(weights=weights, norm_layer=norm), weights)
    return MaskRCNN(_resnet_fpn_extractor(body, trainable_layers=5), num_classes=COCO_CLASSES, **kwargs)


# name -> (builder, COCO weights enum or None, whether pretrained weights come with frozen batch norm)
ARCHITECTURES = {
    "maskrcnn_resnet50_fpn": (_r50_v1, tv_mask_rcnn.MaskRCNN_ResNet50_FPN_Weights.COCO_V1, True),
    "maskrcnn_resnet50_fpn_v2": (_r50_v2, tv_mask_rcnn.MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1, False),
    "maskrcnn_resnet101_fpn": (_r101, None, True),
}
DEFAULT_TRAINABLE_LAYERS = 3  # torchvision's default when fine-tuning from pretrained weights


def image_size_kwargs(img_size: int) -> dict:
    """The model's own resize: shorter side to ``img_size``, longer side capped in torchvision's 800:1333 ratio."""
    return {"min_size": img_size, "max_size": max(img_size, round(img_size * 1333 / 800))}


def is_pretrained(weights: str | os.PathLike | None) -> bool:
    return weights is not None and str(weights).lower() != "none"


def uses_frozen_bn(arch: str, weights: str | os.PathLike | None) -> bool:
    """Pretrained v1 and ResNet-101 models keep batch norm frozen, as torchvision builds them."""
    return is_pretrained(weights) and ARCHITECTURES[arch][2]


def build_model(arch: str, num_classes: int, weights: str | os.PathLike | None = "coco",
                trainable_layers: int | None = None, img_size: int = 800,
                frozen_bn: bool | None = None, mask_head: str = "standard",
                mask_resolution: int = DEFAULT_RESOLUTION, classes: list[str] | None = None) -> MaskRCNN:
    """Mask R-CNN for ``num_classes`` classes plus background.

    ``weights``: ``"coco"`` (torchvision's COCO weights, downloaded to torch's cache), ``None`` or
    ``"none"`` (random init), or a path to a torchvision-format state dict or a segkit checkpoint.
    From a segkit checkpoint, given the new ``classes`` (names, without the background), each class
    the checkpoint knows keeps its trained head rows, matched by name whatever its position; new
    classes start from random init. A plain state dict keeps its heads only for the same class count.
    ``trainable_layers`` (0..5) freezes the earliest ResNet stages as torchvision does; from random
    init everything trains. ``frozen_bn`` overrides the batch-norm choice (used when reloading).
    ``mask_head``: ``"standard"`` (torchvision's 28 x 28 masks) or ``"pointrend"`` (masks refined up to
    ``mask_resolution`` squared; the point head starts from random init whatever ``weights`` say).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    if mask_head not in MASK_HEADS:
        raise ValueError(f"unknown mask head {mask_head!r}; choose one of: {', '.join(MASK_HEADS)}")
    if mask_head == "pointrend":
        check_resolution(mask_resolution)  # before any download
    builder, coco_weights, _ = ARCHITECTURES[arch]
    pretrained = is_pretrained(weights)
    frozen = uses_frozen_bn(arch, weights) if frozen_bn is None else frozen_bn
    norm = misc_nn_ops.FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    imagenet = pretrained and str(weights).lower() == "coco" and coco_weights is None
    model = builder(norm, imagenet, **image_size_kwargs(img_size))
    file_classes = None
    if pretrained:
        file_classes = _load_starting_weights(model, arch, weights, coco_weights)
        freeze_backbone(model, DEFAULT_TRAINABLE_LAYERS if trainable_layers is None else trainable_layers)
    if file_classes is not None and classes is not None:
        # Retraining a served model on its project: a label added, removed or reordered in Label
        # Studio must not hand one class's trained head to another.
        predictors = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(PREDICTORS)}
        replace_heads(model, num_classes)
        shared = {k: v for k, v in predictors.items() if k not in CLASS_ROWS}  # e.g. the mask deconvolution
        model.load_state_dict({**shared, **match_class_rows(predictors, model.state_dict(), CLASS_ROWS,
                                                            file_classes, classes)}, strict=False)
    else:
        # A state dict of the same class count keeps its heads; COCO's 91 slots, or another count, get new ones.
        same_classes = str(weights).lower() != "coco" and \
            model.roi_heads.box_predictor.cls_score.out_features == num_classes
        if not (pretrained and same_classes):
            replace_heads(model, num_classes)
    if mask_head == "pointrend":
        model.roi_heads = PointRendRoIHeads.from_roi_heads(model.roi_heads, num_classes, mask_resolution)
        model.transform = FullResolutionTransform.from_transform(model.transform)  # point labels at full resolution
    return model


def freeze_backbone(model: MaskRCNN, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` ResNet stages, exactly as torchvision's extractor does."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable layers must be 0..5, got {trainable_layers}")
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in model.backbone.body.named_parameters():
        if all(not name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)


PREDICTORS = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.")  # what replace_heads makes anew
# The predictors' per-class tensors and how many rows each class has in them (index 0 is the background).
CLASS_ROWS = {"roi_heads.box_predictor.cls_score.weight": 1, "roi_heads.box_predictor.cls_score.bias": 1,
              "roi_heads.box_predictor.bbox_pred.weight": 4, "roi_heads.box_predictor.bbox_pred.bias": 4,
              "roi_heads.mask_predictor.mask_fcn_logits.weight": 1, "roi_heads.mask_predictor.mask_fcn_logits.bias": 1}


def match_class_rows(trained: dict[str, Tensor], fresh: dict[str, Tensor], rows: dict[str, int],
                     trained_classes: list[str], classes: list[str]) -> dict[str, Tensor]:
    """``fresh``'s per-class tensors (keys of ``rows``) with the rows of the background and of every
    class ``trained`` knows copied from ``trained``, matched by class name (:func:`class_key`, as the
    Label Studio backend matches labels); the others stay fresh."""
    where = {class_key(name): i for i, name in enumerate(trained_classes, start=1)}
    pairs = [(0, 0)] + [(j, where[class_key(name)]) for j, name in enumerate(classes, start=1)
                        if class_key(name) in where]
    out = {}
    for key, n in rows.items():
        tensor = fresh[key].clone()
        for new, old in pairs:
            tensor[new * n:(new + 1) * n] = trained[key][old * n:(old + 1) * n]
        out[key] = tensor
    return out


def replace_heads(model: MaskRCNN, num_classes: int) -> None:
    """New box and mask predictors for ``num_classes`` (background included)."""
    box_in = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(box_in, num_classes)
    mask_in = model.roi_heads.mask_predictor.conv5_mask.in_channels
    model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_in, 256, num_classes)


def _load_starting_weights(model: MaskRCNN, arch: str, weights, coco_weights) -> list[str] | None:
    """Load ``weights`` (heads sized as in the file); the class names a segkit checkpoint records, else None."""
    classes = None
    if str(weights).lower() == "coco":
        if coco_weights is None:
            return None  # the builder loaded the ImageNet backbone
        state = _load_or_explain(lambda: coco_weights.get_state_dict(progress=True, check_hash=True), coco_weights)
    else:
        state, classes = read_weights(Path(weights))
        # a PointRend checkpoint as starting weights: its point head is per class, and starts anew like the predictors
        state = {k: v for k, v in state.items() if not k.startswith("roi_heads.point_head.")}
    num_in_file = state["roi_heads.box_predictor.cls_score.weight"].shape[0] if \
        "roi_heads.box_predictor.cls_score.weight" in state else COCO_CLASSES
    if num_in_file != COCO_CLASSES:
        replace_heads(model, num_in_file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{weights}: not a {arch} state dict (missing {len(missing)} keys, e.g. "
                           f"{missing[:3]}; unexpected {len(unexpected)}, e.g. {unexpected[:3]})")
    if coco_weights is tv_mask_rcnn.MaskRCNN_ResNet50_FPN_Weights.COCO_V1:
        overwrite_eps(model, 0.0)  # as torchvision does for these weights: they were trained with eps=0
    return classes


def checkpoint_classes(path: str | os.PathLike) -> list[str] | None:
    """The class names a segkit checkpoint at ``path`` records, read without loading its tensors; else None."""
    try:
        return _named_classes(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001 - not a (zip-format) checkpoint: no names to read
        return None


def _named_classes(obj) -> list[str] | None:
    """A segkit checkpoint's class names; None for a state dict or torchvision references' checkpoint."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("classes"), (list, tuple)):
        return list(obj["classes"])
    return None


def read_weights(path: Path) -> tuple[dict, list[str] | None]:
    """A weights file's state dict, and its class names when it is a segkit checkpoint (else None)."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file (use --weights coco, none, or a .pt/.pth path)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle errors come in many types; all mean the same to a user
        raise WeightsError(f"{path}: cannot be loaded as weights ({type(e).__name__}: {e})") from e
    classes = _named_classes(obj)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a segkit (or torchvision references) checkpoint
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj, classes


def _load_or_explain(load, weights_enum, target: str | None = None):
    """Run ``load``; when the download fails, stop with where to put the file by hand.

    ``weights_enum`` needs only a ``url``; ``target`` says where the file goes when it is not torch's cache.
    """
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - urllib, ssl and socket errors all mean "not reachable"
        if weights_enum is None:
            raise
        file_name = weights_enum.url.rsplit("/", 1)[-1]
        target = target or Path(torch.hub.get_dir()) / "checkpoints" / file_name
        raise WeightsError(
            f"could not download pretrained weights {file_name} ({type(e).__name__}: {e}).\n"
            f"  Download {weights_enum.url} on a machine with internet and put it at {target}\n"
            f"  (or set TORCH_HOME), pass --weights PATH to a local copy, or train from scratch with --weights none."
        ) from e


def coco_pretrained() -> tuple[MaskRCNN, list[str]]:
    """torchvision's COCO Mask R-CNN as published (91 class slots) and its class names, for the demo."""
    weights = ARCHITECTURES["maskrcnn_resnet50_fpn"][1]
    model = _load_or_explain(lambda: tv_mask_rcnn.maskrcnn_resnet50_fpn(weights=weights), weights)
    return model, list(weights.meta["categories"][1:])


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def carried_heads(weights: str | os.PathLike | None, classes: list[str]) -> str | None:
    """What a start from a segkit checkpoint of other classes keeps (matched by name), said so that a
    renamed label's fresh start is no surprise; None when there is nothing to say."""
    if not is_pretrained(weights) or str(weights).lower() == "coco":
        return None
    known = checkpoint_classes(weights)
    if known is None or known == classes:
        return None
    known_keys, keys = {class_key(c) for c in known}, {class_key(c) for c in classes}
    kept = [c for c in classes if class_key(c) in known_keys]
    new = [c for c in classes if class_key(c) not in known_keys]
    dropped = [c for c in known if class_key(c) not in keys]
    return (f"starting from {weights}: trained heads kept for {', '.join(kept) or 'no class'}; "
            f"new for {', '.join(new) or 'no class'}" + (f"; not in this data: {', '.join(dropped)}" if dropped else ""))
