"""Overlays change the pixels of the drawn instances and nothing else; instance PNGs hold exact ids."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segkit.structures.prediction import Prediction
from segkit.inference.visualize import PALETTE, instance_mask_png, overlay, side_by_side

W, H = 200, 150
BACKGROUND = (40, 40, 40)  # far from every palette colour, so blending always changes a pixel


def make_prediction(rects: list[tuple[int, int, int, int]], labels: list[int], scores: list[float],
                    size: tuple[int, int] = (W, H), classes=("leaf", "pebble", "shell")) -> Prediction:
    """Rectangular masks with tight boxes."""
    masks = np.zeros((len(rects), size[1], size[0]), dtype=bool)
    for mask, (x1, y1, x2, y2) in zip(masks, rects):
        mask[y1:y2, x1:x2] = True
    return Prediction(boxes=np.array(rects, dtype=np.float32).reshape(-1, 4), labels=np.array(labels, dtype=np.int64),
                      class_names=[classes[k - 1] for k in labels], scores=np.array(scores, dtype=np.float32),
                      masks=masks)


@pytest.fixture
def image() -> Image.Image:
    return Image.new("RGB", (W, H), BACKGROUND)


@pytest.fixture
def prediction() -> Prediction:
    return make_prediction([(20, 60, 70, 110), (120, 40, 180, 120)], labels=[1, 2], scores=[0.9, 0.8])


def changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    return (np.asarray(a, dtype=np.int16) != np.asarray(b, dtype=np.int16)).any(axis=2)


def test_fill_only_changes_exactly_the_mask_pixels(image, prediction):
    out = overlay(image, prediction, draw_boxes=False, draw_labels=False)
    assert out.size == image.size and out.mode == "RGB"
    np.testing.assert_array_equal(changed(image, out), prediction.masks.any(axis=0))


def test_boxes_and_labels_stay_near_their_instance(image, prediction):
    out = overlay(image, prediction)
    diff = changed(image, out)
    near = np.zeros_like(diff)
    for x1, y1, x2, y2 in prediction.boxes.astype(int):
        near[max(y1 - 30, 0):y2 + 3, max(x1 - 3, 0):x2 + 60] = True  # box, its outline, label strip above
    assert diff[prediction.masks.any(axis=0)].all()
    assert not diff[~near].any(), "pixels changed far from every instance"
    # Label text sits above the first box: something was drawn there.
    assert diff[45:60, 20:70].any()


def test_contour_is_drawn_in_the_class_colour(image, prediction):
    out = np.asarray(overlay(image, prediction, alpha=0.0, draw_boxes=False, draw_labels=False))
    np.testing.assert_array_equal(out[60, 40], PALETTE[0])  # top edge of instance 1 (class 1)
    np.testing.assert_array_equal(out[80, 120], PALETTE[1])  # left edge of instance 2 (class 2)
    np.testing.assert_array_equal(out[85, 45], BACKGROUND)  # interiors are untouched at alpha 0
    np.testing.assert_array_equal(out[80, 150], BACKGROUND)


def test_empty_prediction_returns_the_image_unchanged(image):
    empty = make_prediction([], labels=[], scores=[])
    out = overlay(image, empty)
    assert out is not image
    assert not changed(image, out).any()


def test_class_filter_hides_other_classes(image, prediction):
    out = overlay(image, prediction, class_filter=["pebble"], draw_boxes=False, draw_labels=False)
    np.testing.assert_array_equal(changed(image, out), prediction.masks[1])


def test_odd_modes_are_drawn_on_rgb(prediction):
    gray = Image.new("L", (W, H), 40)
    out = overlay(gray, prediction)
    assert out.mode == "RGB" and out.size == gray.size


def test_size_mismatch_is_an_error(prediction):
    with pytest.raises(ValueError, match="not"):
        overlay(Image.new("RGB", (W + 1, H)), prediction)


def test_instance_png_ids_match_masks_and_higher_score_wins_overlaps():
    pred = make_prediction([(10, 10, 60, 60), (40, 40, 100, 100), (150, 10, 190, 50)], labels=[1, 1, 3],
                           scores=[0.9, 0.7, 0.5])
    png = instance_mask_png(pred)
    assert png.mode == "L" and png.size == (W, H)
    ids = np.asarray(png)
    assert set(np.unique(ids)) == {0, 1, 2, 3}
    assert (ids[pred.masks[0]] == 1).all()  # instance 1 keeps the overlap
    np.testing.assert_array_equal(ids == 2, pred.masks[1] & ~pred.masks[0])
    np.testing.assert_array_equal(ids == 3, pred.masks[2])
    np.testing.assert_array_equal(ids == 0, ~pred.masks.any(axis=0))


def test_instance_png_is_16_bit_beyond_255_instances():
    rects = [(x, y, x + 4, y + 4) for y in range(0, 100, 5) for x in range(0, 75, 5)]  # 300 instances
    pred = make_prediction(rects, labels=[1] * len(rects), scores=list(np.linspace(1, 0.1, len(rects))), size=(80, 100))
    png = instance_mask_png(pred)
    assert png.mode == "I;16"
    ids = np.asarray(png)
    assert ids.max() == 300 and ids[pred.masks[299]].tolist() == [300] * 16


def test_side_by_side_puts_prediction_beside_ground_truth(image, prediction):
    truth = make_prediction([(20, 60, 70, 110)], labels=[1], scores=[float("nan")])
    out = side_by_side(image, prediction, truth)
    assert out.width > 2 * W and out.height > H


def test_ground_truth_from_a_record_is_labelled_with_the_class_only(image):
    from pathlib import Path

    from segkit.data.records import ImageRecord, Instance

    square = Instance("pebble", [[20, 60, 70, 60, 70, 110, 20, 110]], (20, 60, 70, 110))
    record = ImageRecord(Path("x.jpg"), W, H, [square, Instance("shell", None, (0, 0, 5, 5))])  # a box: no mask
    truth = Prediction.from_record(record, ["leaf", "pebble", "shell"])
    assert truth.labels.tolist() == [2] and truth.class_names == ["pebble"] and np.isnan(truth.scores).all()
    assert abs(int(truth.masks[0].sum()) - 50 * 50) < 150 and truth.image_size == (W, H)
    scored = Prediction(truth.boxes, truth.labels, truth.class_names, np.ones(1, np.float32), truth.masks)
    outside = ~truth.masks[0]  # the label: "pebble" is narrower than "pebble 1.00"
    assert 0 < changed(image, overlay(image, truth))[outside].sum() < changed(image, overlay(image, scored))[outside].sum()
