"""Build Mask R-CNN from an explicit table of architectures and load its starting weights.

Transfer learning the torchvision way: build the architecture exactly as torchvision does for
pretrained weights (frozen batch norm, frozen early backbone stages), load the COCO state dict
(91 classes), then replace the box and mask predictors with fresh ones for the user's classes.
With ``mask_head="pointrend"`` a PointRend point head (:mod:`segkit.models.pointrend`, random init) is
added on top of the 28 x 28 mask head, which stays as its coarse predictor.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import (MobileNet_V2_Weights, MobileNet_V3_Large_Weights, ResNet50_Weights, ResNet101_Weights,
                                resnet50, resnet101)
from torchvision.models._api import WeightsEnum
from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_FPN_Weights, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, mobilenet_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import misc as misc_nn_ops

from segkit.models.pointrend import (DEFAULT_RESOLUTION, MASK_HEADS, FullResolutionTransform, PointRendRoIHeads,
                              check_resolution)
from segkit.data.records import class_key

COCO_CLASSES = 91  # torchvision's COCO heads, background and "N/A" slots included
# The mobile models' proposals and sampled RoIs (see Architecture). Inference: torchvision's mobile 320 detector
# keeps 150; measured (bench/speed.py, the ImageNet-started MobileNetV2 vehicles model, 15 val photos): mask AP
# 0.608 at 1000, 0.610 at 150, in about half the time; 150 still leaves room for the 100 detections COCO AP counts.
MOBILE_RECIPE = {"test_proposals": 150, "train_proposals": 500, "train_rois": 128}


class WeightsError(RuntimeError):
    """Starting weights could not be found or loaded; the message says what to do instead."""


def _resnet_fpn(classifier):
    def build(norm: type[nn.Module], **kwargs) -> MaskRCNN:
        body = classifier(weights=None, norm_layer=norm)
        return MaskRCNN(_resnet_fpn_extractor(body, trainable_layers=5), num_classes=COCO_CLASSES, **kwargs)
    return build


def _r50_v2(norm: type[nn.Module], **kwargs) -> MaskRCNN:
    # torchvision's v2 recipe uses plain BatchNorm everywhere; its builder is the one place that knows it.
    return tv_mask_rcnn.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=COCO_CLASSES, **kwargs)


def _mobilenet_fpn(name: str):
    """torchvision's mobile detector recipe (``fasterrcnn_mobilenet_v3_large_fpn``) with a mask head: FPN on the
    last two stages (strides 16 and 32) plus a pooled level, five anchor sizes on every level."""
    def build(norm: type[nn.Module], **kwargs) -> MaskRCNN:
        backbone = mobilenet_backbone(backbone_name=name, weights=None, fpn=True, norm_layer=norm, trainable_layers=6)
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
        return MaskRCNN(backbone, num_classes=COCO_CLASSES, rpn_anchor_generator=anchors, rpn_score_thresh=0.05,
                        **kwargs)
    return build


@dataclass(frozen=True)
class Architecture:
    """One row of the model table: how to build it and where each pretrained start comes from."""

    build: Callable[..., MaskRCNN]  # (norm layer, **MaskRCNN kwargs) -> a model with COCO's 91 class slots
    backbone: str  # the torchvision classifier whose ImageNet weights start the backbone
    imagenet: WeightsEnum  # those weights
    coco: WeightsEnum | None = None  # torchvision's COCO weights: all of Mask R-CNN, or of a detector (below)
    coco_masks: bool = True  # False: ``coco`` is a Faster R-CNN; the mask head starts fresh
    frozen_bn: bool = True  # pretrained starts keep batch norm frozen, as torchvision builds them
    # Proposals kept after the RPN's NMS at inference (torchvision: 1000). Fewer make the box and mask
    # heads cheaper; the mobile value is measured in bench/speed.py (latency and mask AP against 1000).
    test_proposals: int = 1000
    # Training: proposals kept after the RPN's NMS per image (torchvision: 2000), and the RoIs sampled from them
    # for the box and mask heads (--roi-batch-size; torchvision: 512). On the mobile models these heads are
    # most of a step: 128 and 500 make it 0.2-0.3x R50-FPN's (bench/speed.py; bench/transfer.py: the AP).
    train_proposals: int = 2000
    train_rois: int = 512


ARCHITECTURES = {
    "maskrcnn_resnet50_fpn": Architecture(_resnet_fpn(resnet50), "resnet50", ResNet50_Weights.IMAGENET1K_V1,
                                          tv_mask_rcnn.MaskRCNN_ResNet50_FPN_Weights.COCO_V1),
    "maskrcnn_resnet50_fpn_v2": Architecture(_r50_v2, "resnet50", ResNet50_Weights.IMAGENET1K_V1,
                                             tv_mask_rcnn.MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1, frozen_bn=False),
    # torchvision has no COCO weights for these two: "coco" starts them from an ImageNet backbone.
    "maskrcnn_resnet101_fpn": Architecture(_resnet_fpn(resnet101), "resnet101", ResNet101_Weights.IMAGENET1K_V2),
    "maskrcnn_mobilenet_v2_fpn": Architecture(_mobilenet_fpn("mobilenet_v2"), "mobilenet_v2",
                                              MobileNet_V2_Weights.IMAGENET1K_V1, **MOBILE_RECIPE),
    "maskrcnn_mobilenet_v3_large_fpn": Architecture(
        _mobilenet_fpn("mobilenet_v3_large"), "mobilenet_v3_large", MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1, coco_masks=False, **MOBILE_RECIPE),
}
DEFAULT_TRAINABLE_LAYERS = 3  # torchvision's default when fine-tuning from pretrained weights (ResNet and mobile)


def image_size_kwargs(img_size: int) -> dict:
    """The model's own resize: shorter side to ``img_size``, longer side capped in torchvision's 800:1333 ratio."""
    return {"min_size": img_size, "max_size": max(img_size, round(img_size * 1333 / 800))}


def is_pretrained(weights: str | os.PathLike | None) -> bool:
    return weights is not None and str(weights).lower() != "none"


def architecture(arch: str) -> Architecture:
    """The model table's row for ``arch``; an unknown name raises ValueError listing the known ones."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def uses_frozen_bn(arch: str, weights: str | os.PathLike | None) -> bool:
    """Pretrained starts keep batch norm frozen where torchvision builds them so (all but R50 v2)."""
    return is_pretrained(weights) and architecture(arch).frozen_bn


def build_model(arch: str, num_classes: int, weights: str | os.PathLike | None = "coco",
                trainable_layers: int | None = None, img_size: int = 800,
                frozen_bn: bool | None = None, mask_head: str = "standard",
                mask_resolution: int = DEFAULT_RESOLUTION, classes: list[str] | None = None) -> MaskRCNN:
    """Mask R-CNN for ``num_classes`` classes plus background.

    ``weights``: ``"coco"`` (torchvision's COCO weights, downloaded to torch's cache; for an architecture
    torchvision has no COCO Mask R-CNN of, its COCO detector without the mask head, or else an ImageNet
    backbone), ``"imagenet"`` (torchvision's ImageNet backbone, the rest fresh), ``None`` or ``"none"``
    (random init), or a path: a torchvision-format state dict of this model, a segkit checkpoint, or a
    backbone-only state dict (``torchvision.models.<backbone>().features``, or a ResNet without ``fc``).
    From a segkit checkpoint, given the new ``classes`` (names, without the background), each class
    the checkpoint knows keeps its trained head rows, matched by name whatever its position; new
    classes start from random init. A plain state dict keeps its heads only for the same class count.
    ``trainable_layers`` (ResNet 0..5, MobileNet 0..6) freezes the earliest backbone stages as torchvision
    does; from random init everything trains. ``frozen_bn`` overrides the batch-norm choice (used when reloading).
    ``mask_head``: ``"standard"`` (torchvision's 28 x 28 masks) or ``"pointrend"`` (masks refined up to
    ``mask_resolution`` squared; the point head starts from random init whatever ``weights`` say).
    """
    spec = architecture(arch)
    if mask_head not in MASK_HEADS:
        raise ValueError(f"unknown mask head {mask_head!r}; choose one of: {', '.join(MASK_HEADS)}")
    if mask_head == "pointrend":
        check_resolution(mask_resolution)  # before any download
    pretrained = is_pretrained(weights)
    frozen = uses_frozen_bn(arch, weights) if frozen_bn is None else frozen_bn
    norm = misc_nn_ops.FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    model = spec.build(norm, rpn_pre_nms_top_n_test=spec.test_proposals, rpn_post_nms_top_n_test=spec.test_proposals,
                       rpn_pre_nms_top_n_train=spec.train_proposals, rpn_post_nms_top_n_train=spec.train_proposals,
                       box_batch_size_per_image=spec.train_rois, **image_size_kwargs(img_size))
    file_classes, heads_loaded = None, False
    if pretrained:
        file_classes, heads_loaded = _load_starting_weights(model, arch, weights)
        freeze_backbone(model, DEFAULT_TRAINABLE_LAYERS if trainable_layers is None else trainable_layers)
    if file_classes is not None and classes is not None:
        # Retraining a served model on its project: a label added, removed or reordered in Label
        # Studio must not hand one class's trained head to another.
        predictors = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(PREDICTORS)}
        replace_heads(model, num_classes)
        shared = {k: v for k, v in predictors.items() if k not in CLASS_ROWS}  # e.g. the mask deconvolution
        model.load_state_dict({**shared, **match_class_rows(predictors, model.state_dict(), CLASS_ROWS,
                                                            file_classes, classes)}, strict=False)
    elif not (heads_loaded and model.roi_heads.box_predictor.cls_score.out_features == num_classes):
        # A state dict of the same class count keeps its heads; COCO's 91 slots, or another count, get new ones.
        replace_heads(model, num_classes)
    if mask_head == "pointrend":
        model.roi_heads = PointRendRoIHeads.from_roi_heads(model.roi_heads, num_classes, mask_resolution)
        model.transform = FullResolutionTransform.from_transform(model.transform)  # point labels at full resolution
    return model


def _backbone_blocks(model: MaskRCNN) -> list[tuple[str, nn.Module]]:
    return list(model.backbone.body.named_children())


def max_trainable_layers(model: MaskRCNN) -> int:
    """How many backbone stages ``trainable_layers`` can name: 5 for a ResNet, 6 for a MobileNet."""
    return 5 if "layer1" in model.backbone.body else len(_mobilenet_stages(model))


def _mobilenet_stages(model: MaskRCNN) -> list[int]:
    # torchvision's _mobilenet_extractor: a stage starts at each strided block (_is_cn), plus the first and last
    blocks = [b for _, b in _backbone_blocks(model)]
    return [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]


def freeze_backbone(model: MaskRCNN, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` backbone stages, exactly as torchvision's extractors do."""
    limit = max_trainable_layers(model)
    if not 0 <= trainable_layers <= limit:
        raise ValueError(f"trainable layers must be 0..{limit} for this backbone, got {trainable_layers}")
    if "layer1" not in model.backbone.body:
        blocks, stages = _backbone_blocks(model), _mobilenet_stages(model)
        freeze_before = len(blocks) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
        for _, block in blocks[:freeze_before]:
            block.requires_grad_(False)
        return
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


MASK_PARTS = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")  # what a COCO detector's weights lack


def _load_starting_weights(model: MaskRCNN, arch: str, weights) -> tuple[list[str] | None, bool]:
    """Load ``weights`` into ``model``; (the class names a segkit checkpoint records, else None; whether the
    box and mask predictors came from the file, sized as in it)."""
    spec, name = ARCHITECTURES[arch], str(weights).lower()
    if name == "coco" and spec.coco is not None:
        state = _load_or_explain(lambda: spec.coco.get_state_dict(progress=True, check_hash=True), spec.coco)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if spec.coco_masks or not k.startswith(MASK_PARTS)]
        if missing or unexpected:
            raise WeightsError(f"{spec.coco.url}: not {arch}'s COCO weights (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        if spec.coco is tv_mask_rcnn.MaskRCNN_ResNet50_FPN_Weights.COCO_V1:
            overwrite_eps(model, 0.0)  # as torchvision does for these weights: they were trained with eps=0
        return None, False
    if name in ("coco", "imagenet"):
        state = _load_or_explain(lambda: spec.imagenet.get_state_dict(progress=True, check_hash=True), spec.imagenet)
        _load_backbone(model, backbone_state(state), spec.imagenet.url)
        return None, False
    state, classes = read_weights(Path(weights))
    # a PointRend checkpoint as starting weights: its point head is per class, and starts anew like the predictors
    state = {k: v for k, v in state.items() if not k.startswith("roi_heads.point_head.")}
    if not is_whole_model(state):
        _load_backbone(model, _fitting_backbone(model, arch, state, weights), weights)
        return None, False
    num_in_file = state["roi_heads.box_predictor.cls_score.weight"].shape[0] if \
        "roi_heads.box_predictor.cls_score.weight" in state else COCO_CLASSES
    if num_in_file != COCO_CLASSES:
        replace_heads(model, num_in_file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{weights}: not a {arch} state dict (missing {len(missing)} keys, e.g. "
                           f"{missing[:3]}; unexpected {len(unexpected)}, e.g. {unexpected[:3]})")
    return classes, True


def is_whole_model(state: dict) -> bool:
    """A detector's state dict (its keys start at ``backbone.``, ``rpn.``, ...) rather than a backbone's alone."""
    return any(k.startswith("backbone.") for k in state)


def backbone_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A classifier's state dict as the detector's backbone holds it: ``features.`` dropped, classifier left out."""
    return {k.removeprefix("features."): v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}


def _tensor_keys(state: dict) -> list[str]:
    return [k for k in state if not k.endswith("num_batches_tracked")]  # frozen batch norm keeps no counter


def _fitting_backbone(model: MaskRCNN, arch: str, state: dict, path) -> dict[str, Tensor]:
    """``state`` as the backbone's when it is one of this architecture's; else an error saying what was expected."""
    spec, body = ARCHITECTURES[arch], model.backbone.body.state_dict()
    candidate = backbone_state(state)
    expected, found = _tensor_keys(body), _tensor_keys(candidate)
    if set(expected) == set(found):
        wrong = [k for k in expected if candidate[k].shape != body[k].shape]
        if not wrong:
            return candidate
        detail = (f"the names fit but not the shapes, e.g. {wrong[0]}: {tuple(candidate[wrong[0]].shape)} "
                  f"against {tuple(body[wrong[0]].shape)}")
    else:
        detail = f"found {len(found)} tensors, e.g. {found[:3]}"
    what = f"torchvision.models.{spec.backbone}().features" if "layer1" not in model.backbone.body else \
        f"torchvision.models.{spec.backbone}() without fc"
    raise WeightsError(f"{path}: fits neither {arch} (keys backbone.*, rpn.*, roi_heads.*) nor its backbone "
                       f"(a state dict of {what}: {len(expected)} tensors, e.g. {expected[:3]}); {detail}")


def _load_backbone(model: MaskRCNN, state: dict[str, Tensor], source) -> None:
    missing, unexpected = model.backbone.body.load_state_dict(state, strict=False)
    missing = _tensor_keys(missing)
    if missing or unexpected:
        raise WeightsError(f"{source}: not a backbone of this model (missing {missing[:3]}, unexpected {unexpected[:3]})")


# The parts of Mask R-CNN whose starting weights a run reports, in the model's order
PARTS = ("backbone", "FPN", "RPN", "box head", "mask head", "class predictors")


def starting_weights(arch: str, weights: str | os.PathLike | None) -> dict[str, str]:
    """Where each part of ``arch`` starts from with ``weights``: for the run's first lines, config.json and
    the model card. Decided as :func:`build_model` loads (a file is read without its tensors)."""
    spec, name, fresh = architecture(arch), str(weights).lower(), "random init"
    if not is_pretrained(weights):
        return dict.fromkeys(PARTS, fresh)
    if name == "coco" and spec.coco is not None:
        source = f"COCO ({type(spec.coco).__name__}.{spec.coco.name})"
        return {**dict.fromkeys(PARTS[:4], source), "mask head": source if spec.coco_masks else fresh,
                "class predictors": "new, for these classes"}
    if name in ("coco", "imagenet"):
        return {"backbone": f"ImageNet ({type(spec.imagenet).__name__}.{spec.imagenet.name})",
                **dict.fromkeys(PARTS[1:], fresh)}
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        whole = is_whole_model(obj["model"] if isinstance(obj.get("model"), dict) else obj)
    except Exception:  # noqa: BLE001 - a file that is not a zip-format state dict is reported when it is loaded
        whole = True
    if whole:
        return {**dict.fromkeys(PARTS[:5], f"file {weights}"), "class predictors": f"file {weights} (same classes), "
                "else new"}
    return {"backbone": f"backbone file {weights}", **dict.fromkeys(PARTS[1:], fresh)}


def format_start(start: dict[str, str]) -> str:
    """``starting weights: backbone ImageNet (...); FPN, RPN, ...: random init`` (parts with the same source together)."""
    groups: dict[str, list[str]] = {}
    for part, source in start.items():
        groups.setdefault(source, []).append(part)
    return "starting weights: " + "; ".join(f"{', '.join(parts)}: {source}" for source, parts in groups.items())


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
    weights = ARCHITECTURES["maskrcnn_resnet50_fpn"].coco
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
