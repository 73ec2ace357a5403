"""The mobile architectures' starting weights: torchvision's COCO detector mapped onto Mask R-CNN, ImageNet
backbones through torchvision's enums, backbone-only files for air-gapped machines, and what a wrong file says.

No download: torchvision's loader is handed state dicts of torchvision's own models, saved by the tests."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models import _api as torchvision_api
from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_FPN_Weights, fasterrcnn_mobilenet_v3_large_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

from segkit.models.mask_rcnn import (ARCHITECTURES, WeightsError, build_model, format_start, max_trainable_layers,
                                     starting_weights)
from tests.helpers import SHARED

MOBILE = ("maskrcnn_mobilenet_v2_fpn", "maskrcnn_mobilenet_v3_large_fpn")
SHARED_MOBILENET_V2 = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"


@pytest.fixture
def downloads(monkeypatch):
    """torchvision's weight loader answering each URL from ``served`` (url -> state dict); the URLs asked for."""
    served, asked = {}, []

    def download(url, *args, **kwargs):
        asked.append(url)
        return served[url]

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", download)
    return served, asked


def _equal(model, state, prefix, keys):
    sd = model.state_dict()
    return all(torch.equal(sd[prefix + k], state[k]) for k in keys)


def test_coco_start_of_mobilenet_v3_maps_torchvision_detector_and_starts_the_mask_head_fresh(downloads):
    served, asked = downloads
    torch.manual_seed(3)
    detector = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=91)
    state = detector.state_dict()
    url = FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1.url
    served[url] = state
    model = build_model("maskrcnn_mobilenet_v3_large_fpn", 4, weights="coco")
    assert asked == [url]
    sd = model.state_dict()
    carried = [k for k in state if not k.endswith("num_batches_tracked") and not k.startswith("roi_heads.box_predictor")]
    assert len(carried) > 250 and any(k.startswith("rpn.") for k in carried)
    for key in carried:  # backbone, FPN, RPN and box head: the detector's tensors, unchanged
        assert torch.equal(sd[key], state[key]), key
    assert sd["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    assert sd["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 4
    assert "roi_heads.mask_head.0.0.weight" not in state  # the mask head is Mask R-CNN's own, fresh
    assert isinstance(model.backbone.body["0"][1], FrozenBatchNorm2d)  # as torchvision fine-tunes it
    start = starting_weights("maskrcnn_mobilenet_v3_large_fpn", "coco")
    assert start["RPN"] == start["box head"] == "COCO (FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1)"
    assert start["mask head"] == "random init"


@pytest.mark.parametrize("arch", ["maskrcnn_mobilenet_v2_fpn", "maskrcnn_mobilenet_v3_large_fpn",
                                  "maskrcnn_resnet50_fpn"])
def test_imagenet_start_loads_torchvision_classifier_into_the_backbone(arch, downloads):
    served, asked = downloads
    spec = ARCHITECTURES[arch]
    torch.manual_seed(4)
    classifier = getattr(torchvision.models, spec.backbone)()
    served[spec.imagenet.url] = classifier.state_dict()  # the classifier's file, fc/classifier included
    model = build_model(arch, 3, weights="imagenet")
    assert asked == [spec.imagenet.url]
    features = classifier.features.state_dict() if hasattr(classifier, "features") else \
        {k: v for k, v in classifier.state_dict().items() if not k.startswith("fc.")}
    body = {k: v for k, v in features.items() if not k.endswith("num_batches_tracked")}
    assert _equal(model, body, "backbone.body.", body)
    assert starting_weights(arch, "imagenet")["backbone"] == \
        f"ImageNet ({type(spec.imagenet).__name__}.{spec.imagenet.name})"
    assert starting_weights(arch, "imagenet")["FPN"] == "random init"


def test_coco_for_an_architecture_without_coco_weights_is_its_imagenet_backbone(downloads):
    served, asked = downloads
    spec = ARCHITECTURES["maskrcnn_mobilenet_v2_fpn"]
    served[spec.imagenet.url] = torchvision.models.mobilenet_v2().state_dict()
    build_model("maskrcnn_mobilenet_v2_fpn", 3, weights="coco")
    assert asked == [spec.imagenet.url]


def test_backbone_only_file_is_recognised_and_the_early_stages_stay_frozen(tmp_path):
    torch.manual_seed(5)
    features = torchvision.models.mobilenet_v3_large().features.state_dict()
    path = tmp_path / "mnv3_features.pth"
    torch.save(features, path)
    model = build_model("maskrcnn_mobilenet_v3_large_fpn", 3, weights=path, trainable_layers=3)
    body = {k: v for k, v in features.items() if not k.endswith("num_batches_tracked")}
    assert _equal(model, body, "backbone.body.", body)
    frozen = {n.split(".")[2] for n, p in model.named_parameters() if n.startswith("backbone.body.")
              and not p.requires_grad}
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if n.startswith("backbone.body.")
                 and p.requires_grad}
    # torchvision's stages of MobileNetV3-Large start at blocks 0, 2, 4, 7, 13, 16: the last 3 train
    assert frozen == {str(i) for i in range(7)} and trainable == {str(i) for i in range(7, 17)}
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone.body."))
    assert max_trainable_layers(model) == 6
    assert format_start(starting_weights("maskrcnn_mobilenet_v3_large_fpn", path)) == (
        f"starting weights: backbone: backbone file {path}; FPN, RPN, box head, mask head, class predictors: random init")


def test_the_shared_imagenet_mobilenet_v2_file_loads_as_the_backbone():
    if not SHARED_MOBILENET_V2.is_file():
        pytest.skip(f"{SHARED_MOBILENET_V2} is not here (../shared is the team's, not in a user's clone)")
    features = torch.load(SHARED_MOBILENET_V2, weights_only=True)
    model = build_model("maskrcnn_mobilenet_v2_fpn", 3, weights=SHARED_MOBILENET_V2)
    body = {k: v for k, v in features.items() if not k.endswith("num_batches_tracked")}
    assert _equal(model, body, "backbone.body.", body)


def test_a_backbone_of_another_architecture_is_refused_naming_what_was_expected(tmp_path):
    path = tmp_path / "mnv2_features.pth"
    torch.save(torchvision.models.mobilenet_v2().features.state_dict(), path)
    with pytest.raises(WeightsError) as err:
        build_model("maskrcnn_mobilenet_v3_large_fpn", 3, weights=path)
    message = str(err.value)
    assert str(path) in message and "torchvision.models.mobilenet_v3_large().features" in message
    assert "found" in message or "shapes" in message
    with pytest.raises(WeightsError, match=r"resnet50\(\) without fc"):
        build_model("maskrcnn_resnet50_fpn", 3, weights=path)


@pytest.mark.parametrize("arch", [*MOBILE, "maskrcnn_resnet50_fpn"])
def test_each_architecture_keeps_its_own_proposals_and_rois(arch):
    """The mobile models keep fewer proposals (measured in bench/speed.py and bench/transfer.py); the ResNets
    torchvision's 1000 / 2000 / 512. A run's --roi-batch-size still wins over the architecture's."""
    from segkit.engine.config import TrainConfig
    from segkit.tasks import get_task

    model = build_model(arch, 3, weights=None, img_size=256)
    rpn, sampler = model.rpn, model.roi_heads.fg_bg_sampler
    mobile = arch in MOBILE
    assert rpn._post_nms_top_n["testing"] == rpn._pre_nms_top_n["testing"] == (150 if mobile else 1000)
    assert rpn._post_nms_top_n["training"] == (500 if mobile else 2000)
    assert sampler.batch_size_per_image == (128 if mobile else 512)
    task = get_task("instance")
    assert task.build_model(TrainConfig(model=arch, weights="none"), ["a", "b"], False) \
        .roi_heads.fg_bg_sampler.batch_size_per_image == (128 if mobile else 512)
    assert task.build_model(TrainConfig(model=arch, weights="none", roi_batch_size=64), ["a", "b"], False) \
        .roi_heads.fg_bg_sampler.batch_size_per_image == 64


@pytest.mark.parametrize("arch", MOBILE)
def test_pointrend_runs_on_the_mobile_models(arch):
    """PointRend's point head samples the finest FPN level, stride 16 here instead of 4: it trains and predicts."""
    torch.manual_seed(0)
    model = build_model(arch, 3, weights=None, img_size=160, mask_head="pointrend", mask_resolution=112)
    image = torch.rand(3, 160, 200)
    masks = torch.zeros(1, 160, 200, dtype=torch.uint8)
    masks[0, 40:100, 50:120] = 1
    target = {"boxes": torch.tensor([[50.0, 40.0, 120.0, 100.0]]), "labels": torch.tensor([1]), "masks": masks}
    losses = model([image], [target])
    assert losses["loss_mask_point"].item() > 0 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([image])[0]
    assert out["masks"].shape[-2:] == (160, 200)
