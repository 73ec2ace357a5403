"""Test-time augmentation (segkit.inference.tta): views mapped back onto the image exactly, and voted.

As in test_tiles, a detector whose answer is known exactly (red discs) checks the mapping and the vote;
the trained model then runs through the same code in the Predictor and ``segkit evaluate --tta``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from segkit.inference.tiles import Tiling
from segkit.inference.tta import TTA, predict_tta, vote
from segkit.structures.masks import Crop, InstanceMasks
from segkit.structures.prediction import Prediction
from tests.helpers import SAMPLE
from tests.inference.test_tiles import find_discs, iou, scene

DISCS = [(120, 100, 40), (420, 260, 60), (520, 80, 25)]  # on a 600 x 400 photo, none symmetric to another


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def as_image(tensor: torch.Tensor) -> Image.Image:
    return Image.fromarray((tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def discs_in(tensor: torch.Tensor, scale: float) -> Prediction:
    return find_discs(as_image(tensor))


def left_half_only(tensor: torch.Tensor, scale: float) -> Prediction:
    """A detector that sees only the left half of what it is given: each view misses what the other finds."""
    seen = tensor.clone()
    seen[:, :, tensor.shape[-1] // 2:] = 0.4
    return find_discs(as_image(seen))


def test_a_mirrored_view_maps_back_onto_the_image_exactly():
    image, truth = scene(600, 400, DISCS)
    plain = discs_in(as_tensor(image), 1.0)
    both = predict_tta(discs_in, as_tensor(image), TTA(flip=True))
    assert len(both) == len(truth)
    masks = both.instance_masks.dense()
    for disc in truth:
        assert max(iou(disc, m) for m in masks) >= 0.99
    order = np.argsort(plain.boxes[:, 0])
    assert np.allclose(np.sort(both.boxes, axis=0), np.sort(plain.boxes[order], axis=0))
    assert np.allclose(np.sort(both.scores), np.sort(plain.scores))  # found in both views: the same score


def test_each_view_finds_what_the_other_misses_and_an_object_one_view_found_scores_half():
    image, truth = scene(600, 400, DISCS)
    voted = predict_tta(left_half_only, as_tensor(image), TTA(flip=True))
    assert len(voted) == len(truth)  # the left disc from the image, the right two from its mirror
    masks = voted.instance_masks.dense()
    for disc in truth:
        assert max(iou(disc, m) for m in masks) >= 0.99
    alone, mirrored = left_half_only(as_tensor(image), 1.0), left_half_only(as_tensor(image).flip(-1), 1.0)
    assert len(alone) == 1 and len(mirrored) == 2
    assert np.allclose(np.sort(voted.scores), np.sort(np.concatenate([alone.scores, mirrored.scores])) / 2)


def _prediction(masks: list[np.ndarray], scores: list[float]) -> Prediction:
    crops = [Crop.from_dense(m) for m in masks]
    boxes = np.array([[c.x0, c.y0, c.x0 + c.mask.shape[1], c.y0 + c.mask.shape[0]] for c in crops], np.float32)
    return Prediction(boxes.reshape(-1, 4), np.ones(len(masks), np.int64), ["disc"] * len(masks),
                      np.array(scores, np.float32), InstanceMasks(crops, *masks[0].shape))


def test_a_mask_is_what_most_views_agree_on_and_one_view_never_joins_itself():
    _, (disc,) = scene(200, 100, [(60, 50, 30)])
    blob = disc.copy()
    blob[10:30, 100:160] = True  # one view's mask spills onto the background
    twin = np.roll(disc, 12, axis=1)  # a second object in that view, overlapping the first
    voted = vote([_prediction([disc], [0.9]), _prediction([disc], [0.8]), _prediction([blob, twin], [0.7, 0.6])])
    assert len(voted) == 2  # the twin is not merged into the disc: its view already gave the disc
    assert np.array_equal(voted.instance_masks.dense()[0], disc)  # 2 of 3 views: not the spill
    assert voted.scores[0] == pytest.approx((0.9 + 0.8 + 0.7) / 3) and voted.scores[1] == pytest.approx(0.6 / 3)


def test_no_views_beyond_the_image_is_plain_prediction():
    image, _ = scene(600, 400, DISCS)
    a, b = predict_tta(discs_in, as_tensor(image), TTA(flip=False)), discs_in(as_tensor(image), 1.0)
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.masks, b.masks)
    with pytest.raises(ValueError, match="fractions of the model's input size"):
        TTA(scales=(8.0,))


def test_tiles_auto_follow_the_scale_the_model_learned():
    tiling = Tiling("auto", 0.1).resolved({"train_side": 600, "img_size": 512})
    assert (tiling.size, tiling.overlap, tiling.only_above) == (600, 0.1, 1200)
    assert tiling.windows(1100, 900) == [(0, 0, 1100, 900)]  # not much larger than what it learned: whole
    assert len(tiling.windows(4000, 3000)) > 20
    assert Tiling("auto").resolved({"train_side": None, "img_size": 512}).size == 1024  # from before train_side
    tile_trained = Tiling("auto").resolved({"train_side": 384, "train_tiles": 512, "img_size": 384})
    assert tile_trained == Tiling(512)  # every image larger than a tile, as its validation predicted
    assert Tiling("auto").resolved({"arch": "maskrcnn_resnet50_fpn"}).size == 1600  # torchvision's COCO model
    with pytest.raises(ValueError, match="at least 32 px"):
        Tiling("big")


def test_the_trained_model_under_tta(trained_checkpoint):
    """Scales change what the model sees (its input size for that call only); the views vote into one answer."""
    from pathlib import Path

    from segkit.data.readers import load_dataset
    from segkit.data.records import median_side
    from segkit.inference.predictor import Predictor
    from segkit.models.checkpoint import load_checkpoint

    image = Image.open(sorted((SAMPLE / "val" / "images").glob("*.jpg"))[0]).convert("RGB")
    predictor = Predictor.from_checkpoint(trained_checkpoint, "cpu", max_detections=10)
    plain = predictor(image, 0.3)
    with torch.inference_mode():
        larger = predictor._forward([as_tensor(image)], 0.3, 1.5)[0]
    assert predictor.model.transform.min_size == (load_checkpoint(trained_checkpoint)["img_size"],)  # untouched
    assert not np.array_equal(plain.boxes, larger.boxes)
    voted = predictor.augment(TTA(scales=(0.75, 1.25)))(image, 0.3)
    assert 0 < len(voted) <= 10 and voted.image_size == image.size
    everything = predictor(image, 0.0)  # the threshold cuts the voted scores, not each view's
    assert voted.scores.min() >= 0.3 and np.array_equal(voted.scores, everything.scores[everything.scores >= 0.3])
    masks = voted.instance_masks.dense()
    assert all(max(iou(p, m) for m in masks) >= 0.5 for p in plain.masks[plain.scores >= 0.7])
    ckpt = load_checkpoint(trained_checkpoint)
    trained_on = [r for r in load_dataset(ckpt["config"]["data"]).images if str(r.path) in set(ckpt["split"]["train"])
                  or r.path.name in {Path(p).name for p in ckpt["split"]["train"]}]
    assert trained_on and predictor.info["train_side"] == median_side(trained_on)


def test_tta_and_tiles_are_refused_where_they_cannot_work(semantic_checkpoint, exported, capsys):
    from segkit.cli import main
    from segkit.inference.predictor import Predictor, UnsupportedOption

    semantic = Predictor.from_checkpoint(semantic_checkpoint, "cpu")
    with pytest.raises(UnsupportedOption, match="instance models"):
        semantic.augment(TTA())
    with pytest.raises(UnsupportedOption, match="instance models"):
        semantic.tile(Tiling(512))
    onnx = Predictor.from_checkpoint(exported("onnx"))
    with pytest.raises(UnsupportedOption, match="input size is fixed"):
        onnx.augment(TTA(scales=(1.25,)))
    assert onnx.augment(TTA()).tta == TTA()  # mirroring needs no other size
    for option in (["--tile", "512"], ["--tta"]):  # a message and exit status 2, not a traceback
        assert main(["evaluate", "--checkpoint", str(semantic_checkpoint), *option]) == 2
        assert "is for instance models; this one is semantic" in capsys.readouterr().err


def test_segkit_predict_with_tta_writes_its_answers_and_reuses_them(trained_checkpoint, tmp_path, capsys):
    import json

    from segkit.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((SAMPLE / "val" / "images").glob("*.jpg"))[:2]:
        (photos / path.name).write_bytes(path.read_bytes())
    args = ["predict", str(photos), "--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "out"),
            "--max-detections", "10", "--tta", "--tta-scales", "1.25"]
    assert main(args) == 0
    coco = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(coco["images"]) == 2 and coco["annotations"]
    capsys.readouterr()
    assert main(args) == 0 and "2 of 2 images already done" in capsys.readouterr().out
    assert main([*args[:-3]]) == 0 and "already done" not in capsys.readouterr().out  # other views: predicted again
    with pytest.raises(SystemExit):  # argparse: a scale out of range
        main([*args[:-1], "9"])
    assert "in [0.25, 4], not '9'" in capsys.readouterr().err


def test_segkit_evaluate_with_tta(trained_checkpoint, capsys):
    from segkit.cli import main

    args = ["evaluate", "--checkpoint", str(trained_checkpoint), "--split", "val", "--max-detections", "10"]
    assert main([*args, "--tta", "--tta-scales", "1.25", "--json", "/dev/stdout"]) == 0
    assert "mask AP" in capsys.readouterr().out
