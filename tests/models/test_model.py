"""Starting weights: torchvision's COCO path, local state dicts, and the offline message."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import _api as torchvision_api

from segkit.models import mask_rcnn as model_lib
from segkit.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from segkit.tasks.checkpoint import make_checkpoint, model_from_checkpoint
from segkit.models.mask_rcnn import WeightsError, build_model
from tests.helpers import SAMPLE


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
    assert urls == [model_lib.ARCHITECTURES["maskrcnn_resnet50_fpn"].coco.url]
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


@pytest.mark.parametrize("arch,weights,file_name", [
    ("maskrcnn_resnet50_fpn", "coco", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"),
    ("maskrcnn_mobilenet_v3_large_fpn", "coco", "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"),
    ("maskrcnn_mobilenet_v2_fpn", "imagenet", "mobilenet_v2-b0353104.pth")])
def test_offline_coco_weights_say_where_to_put_the_file(monkeypatch, arch, weights, file_name):
    def offline(url, *args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as err:
        build_model(arch, 4, weights=weights)
    message = str(err.value)
    assert file_name in message and "--weights none" in message
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


# --- retraining a checkpoint on a project whose labels changed -----------------------------------

def test_checkpoint_heads_follow_their_class_names(tmp_path):
    """Labels reordered, one renamed: each known class keeps its own trained rows, the new one starts fresh."""
    torch.manual_seed(0)
    old = build_model("maskrcnn_resnet50_fpn", 4, weights=None, img_size=128)
    path = tmp_path / "served.pt"
    save_checkpoint(make_checkpoint(old, "maskrcnn_resnet50_fpn", ["leaf", "pebble", "shell"], img_size=128), path)
    new = build_model("maskrcnn_resnet50_fpn", 4, weights=path, img_size=128,
                      classes=["Shell", "leaf", "stone"])  # case does not count, as in a Label Studio config
    before, after = old.state_dict(), new.state_dict()
    for key, rows in model_lib.CLASS_ROWS.items():
        def row(state, i, key=key, rows=rows):
            return state[key][i * rows:(i + 1) * rows]
        for new_index, old_index in ((0, 0), (1, 3), (2, 1)):  # background, shell, leaf
            assert torch.equal(row(after, new_index), row(before, old_index)), key
        assert not any(torch.equal(row(after, 3), row(before, i)) for i in range(4)), key  # "stone" is new
    for key in ("roi_heads.mask_head.0.0.weight", "roi_heads.mask_predictor.conv5_mask.weight"):  # not per class
        assert torch.equal(after[key], before[key]), key


def test_reordered_labels_detect_the_same_objects_under_their_own_names(trained_checkpoint, sample_dir):
    from PIL import Image

    from segkit.models.forward import detect, image_tensors

    ckpt = load_checkpoint(trained_checkpoint)
    served = model_from_checkpoint(ckpt).eval()
    reordered = ["shell", "leaf", "pebble"]
    retrained = build_model(ckpt["arch"], 4, weights=trained_checkpoint, img_size=ckpt["img_size"],
                            frozen_bn=False, classes=reordered).eval()
    image = image_tensors([Image.open(next((sample_dir / "val" / "images").iterdir()))], torch.device("cpu"))
    with torch.no_grad():
        a, b = detect(served, image)[0], detect(retrained, image)[0]
    assert len(a["scores"]) > 0
    torch.testing.assert_close(b["boxes"], a["boxes"])
    torch.testing.assert_close(b["scores"], a["scores"])
    torch.testing.assert_close(b["mask_probs"], a["mask_probs"])
    names = ckpt["classes"]
    assert [reordered[i - 1] for i in b["labels"]] == [names[i - 1] for i in a["labels"]]


def test_a_hub_address_is_resolved_once_where_it_is_given(hub_downloads, untrained_checkpoint, tmp_path):
    """``hf://`` is downloaded where the user gave it (the command, the demo, ``Predictor.from_checkpoint``) and
    the local file is passed on; reading a checkpoint never downloads behind the caller's back."""
    from segkit.cli import main

    with pytest.raises(CheckpointError, match="resolve_checkpoint"):
        load_checkpoint("hf://someone/leaves/runs/exp/best.pt")
    assert hub_downloads == []
    assert main(["evaluate", "--checkpoint", "hf://someone/leaves/runs/exp/best.pt", "--data", str(SAMPLE / "val"),
                 "--split", "all", "--max-detections", "3"]) == 0
    assert hub_downloads == [("someone/leaves", "runs/exp/best.pt")]
