"""Sliced inference (segkit.inference.tiles): objects cut by a seam come back once, with their whole mask.

The merge is tested with a detector whose answer is known exactly (it finds the red discs of a synthetic
photo, whatever part of them its tile holds), so the test checks the stitching and nothing else; the
trained model then runs through the same code in the Predictor and ``segkit predict --tile``.
"""
from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from segkit.inference.tiles import Tiling, predict_tiled
from segkit.structures.masks import Crop, InstanceMasks
from segkit.structures.prediction import Prediction
from tests.helpers import SAMPLE


def find_discs(image: Image.Image) -> Prediction:
    """Every red connected region of ``image`` (a tile, or the whole photo shrunk), as instances of class 1,
    each mask kept at its box (as the model's are)."""
    rgb = np.asarray(image)
    red = ((rgb[..., 0] > 150) & (rgb[..., 1] < 100)).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(red)
    crops, boxes = [], []
    for k in range(1, count):
        x, y, w, h = stats[k, :4]
        crops.append(Crop(int(x), int(y), labels[y:y + h, x:x + w] == k))
        boxes.append([x, y, x + w, y + h])
    scores = np.array([0.5 + c.mask.sum() / red.size for c in crops], dtype=np.float32)
    return Prediction(np.array(boxes, dtype=np.float32).reshape(-1, 4), np.ones(len(crops), np.int64),
                      ["disc"] * len(crops), scores, InstanceMasks(crops, *red.shape))


def scene(width: int, height: int, discs: list[tuple[int, int, int]]) -> tuple[Image.Image, list[np.ndarray]]:
    image = Image.new("RGB", (width, height), (90, 110, 90))
    truth = []
    for x, y, r in discs:
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=(220, 30, 30))
        mask = Image.new("L", (width, height))
        ImageDraw.Draw(mask).ellipse((x - r, y - r, x + r, y + r), fill=1)
        truth.append(np.asarray(mask, dtype=bool))
    return image, truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


# tiles of 400 at overlap 0.25 start at x = 0, 300, 600 (the last ends at the edge, 1000): seams at 300-400, 600-700
SEAM_CROSSERS = [(390, 200, 60), (650, 450, 90), (300, 300, 25)]  # across a seam, across two, in a corner of four
INSIDE = [(150, 120, 40), (850, 100, 30)]


@pytest.mark.parametrize("whole", [True, False], ids=["with-whole-pass", "tiles-only"])
def test_an_object_across_a_seam_comes_back_once_with_its_whole_mask(whole):
    image, truth = scene(1000, 600, SEAM_CROSSERS + INSIDE)
    found = predict_tiled(find_discs, image, Tiling(400, 0.25, whole=whole))
    assert len(found) == len(truth)  # no disc in pieces, none twice
    masks = found.instance_masks.dense()
    for disc in truth:
        assert max(iou(disc, m) for m in masks) >= 0.95
    assert found.image_size == (1000, 600) and found.class_names == ["disc"] * len(truth)


def test_two_objects_in_one_seam_stay_two():
    image, truth = scene(1000, 600, [(330, 300, 40), (400, 300, 25)])  # 5 px apart, both in the 300-400 band
    found = predict_tiled(find_discs, image, Tiling(400, 0.25, whole=False))
    assert len(found) == 2
    masks = found.instance_masks.dense()
    assert all(max(iou(disc, m) for m in masks) >= 0.95 for disc in truth)


def test_an_image_smaller_than_a_tile_is_predicted_as_it_is(trained_checkpoint):
    from segkit.inference.predictor import Predictor

    image = Image.open(sorted((SAMPLE / "val" / "images").glob("*.jpg"))[0]).convert("RGB")
    plain = Predictor.from_checkpoint(trained_checkpoint, "cpu", max_detections=10)
    tiled = Predictor.from_checkpoint(trained_checkpoint, "cpu", max_detections=10).tile(Tiling(max(image.size)))
    a, b = plain(image, 0.05), tiled(image, 0.05)
    assert len(a) == len(b) and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.masks, b.masks)


def test_memory_follows_a_tile_not_the_photo():
    """A 10000 x 10000 photo (300 MB of pixels) with 300 objects: what the merge holds is box-local."""
    rng = np.random.default_rng(0)
    discs = [(int(x), int(y), 20) for x, y in rng.integers(50, 9950, size=(300, 2))]
    image, _ = scene(10_000, 10_000, discs[:0])
    draw = ImageDraw.Draw(image)
    for x, y, r in discs:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(220, 30, 30))
    tracemalloc.start()
    try:
        found = predict_tiled(find_discs, image, Tiling(1024, 0.25))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 250 <= len(found) <= 300  # discs that overlap each other are one region
    assert peak < 200 * 2**20, peak / 2**20  # a dense (N, H, W) stack of the photo would be 30 GB


def test_segkit_predict_tiles_large_images(trained_checkpoint, tmp_path, capsys):
    """``--tile`` through the whole command: the masks are in the photo's own coordinates, and a re-run with
    other tiles predicts again instead of reusing records made otherwise."""
    import json

    from segkit.cli import main

    photo = Image.open(sorted((SAMPLE / "val" / "images").glob("*.jpg"))[0]).convert("RGB")
    big = Image.new("RGB", (photo.width * 2, photo.height))
    big.paste(photo, (0, 0))
    big.paste(photo, (photo.width, 0))
    big.save(tmp_path / "big.jpg")
    out = tmp_path / "out"
    args = ["predict", str(tmp_path / "big.jpg"), "--checkpoint", str(trained_checkpoint), "--out", str(out),
            "--max-detections", "10", "--score-threshold", "0.3"]
    assert main([*args, "--tile", str(photo.height)]) == 0
    coco = json.loads((out / "predictions.json").read_text())
    assert coco["annotations"] and coco["images"][0]["width"] == big.width
    assert all(a["segmentation"]["size"] == [big.height, big.width] for a in coco["annotations"])
    capsys.readouterr()
    assert main([*args, "--tile", str(photo.height + 8)]) == 0
    assert "already done" not in capsys.readouterr().out
