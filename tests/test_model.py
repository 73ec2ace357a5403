"""Starting weights: torchvision's COCO path, local state dicts, and the offline message."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import _api as torchvision_api

from segkit import model as model_lib
from segkit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from segkit.model import WeightsError, build_model


@pytest.fixture(scope="module")
def coco_format_state(tmp_path_factory):
    """A state dict in the exact format of torchvision's COCO file (91 classes), saved by us: no download."""
    torch.manual_seed(1)
    reference = build_model("maskrcnn_resnet50_fpn", 91, weights=None)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("weights") / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(state, path)
    return state, path


def _assert_backbone_loaded_heads_new(model, state, num_classes):
    sd = model.state_dict()
    for key in ("backbone.body.layer4.2.conv3.weight", "backbone.fpn.layer_blocks.0.0.weight",
                "rpn.head.conv.0.0.weight", "roi_heads.box_head.fc7.weight", "roi_heads.mask_head.0.0.weight"):
        assert torch.equal(sd[key], state[key]), key
    assert sd["roi_heads.box_predictor.cls_score.weight"].shape[0] == num_classes
    assert sd["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == num_classes


def test_coco_weights_load_through_torchvision_enum_and_heads_are_replaced(coco_format_state, monkeypatch):
    state, _ = coco_format_state
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return state

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", fake_download)  # only the download
    model = build_model("maskrcnn_resnet50_fpn", 4, weights="coco", trainable_layers=3)
    assert urls == [model_lib.ARCHITECTURES["maskrcnn_resnet50_fpn"][1].url]
    _assert_backbone_loaded_heads_new(model, state, 4)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("backbone.body.layer1") for n in frozen)
    assert not any(n.startswith("backbone.body.layer2") for n in frozen)
    assert isinstance(model.backbone.body.bn1, torch.nn.Module) and type(model.backbone.body.bn1).__name__ == \
        "FrozenBatchNorm2d"


def test_local_state_dict_path(coco_format_state):
    state, path = coco_format_state
    model = build_model("maskrcnn_resnet50_fpn", 3, weights=path)
    _assert_backbone_loaded_heads_new(model, state, 3)


def test_offline_coco_weights_say_where_to_put_the_file(monkeypatch):
    def offline(url, *args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as err:
        build_model("maskrcnn_resnet50_fpn", 4, weights="coco")
    message = str(err.value)
    assert "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth" in message and "--weights none" in message
    assert "checkpoints" in message  # where torch's cache expects it


def test_wrong_weights_file_is_named(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("not weights")
    with pytest.raises(WeightsError, match="notes.pth"):
        build_model("maskrcnn_resnet50_fpn", 4, weights=bad)


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match="maskrcnn_resnet50_fpn_v2"):
        build_model("yolo", 4, weights=None)


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "arch": "maskrcnn_resnet50_fpn", "classes": ["a"], "img_size": 128,
                "payload": WeightsError("pickled object")}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "arch": "a", "classes": [], "img_size": 1, "epoch": 1}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {}, "arch": "a", "classes": [], "img_size": 1, "epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
