"""Boundary IoU on hand-made masks whose answers are counted by hand."""
from __future__ import annotations

import numpy as np
import pytest

from segkit.evaluation.boundary import BoundaryStats, boundary_iou, boundary_width, mask_boundary
from segkit.structures.masks import Crop


def _square(top: int, left: int, side: int = 20, shape=(50, 50)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_width_is_two_percent_of_the_diagonal_at_least_one_pixel():
    assert boundary_width((50, 50)) == 1  # 0.02 x 70.7 = 1.41
    assert boundary_width((300, 400)) == 10  # 0.02 x 500
    assert boundary_width((10, 10)) == 1  # 0.28 rounds to 0: at least one pixel


def test_boundary_is_the_ring_inside_the_contour_and_the_image_edge_counts():
    ring = mask_boundary(_square(10, 10), 1)
    assert ring.sum() == 20 * 4 - 4 and not ring[11:29, 11:29].any()
    assert mask_boundary(_square(10, 10), 2).sum() == 20 * 20 - 16 * 16
    full = np.ones((10, 10), bool)
    assert mask_boundary(full, 1).sum() == 100 - 64  # the image's edge is a contour, as in the paper's code
    assert not mask_boundary(np.zeros((5, 5), bool), 3).any()


def test_boundary_equals_repeated_erosion():
    """Same as the paper's reference: mask minus `width` 3x3 erosions of the zero-padded mask."""
    import cv2

    rng = np.random.default_rng(0)
    mask = cv2.GaussianBlur(rng.random((60, 80)), (0, 0), 4) > 0.5
    for width in (1, 3, 7):
        eroded = cv2.erode(np.pad(mask, 1).astype(np.uint8), np.ones((3, 3), np.uint8), iterations=width)[1:-1, 1:-1]
        np.testing.assert_array_equal(mask_boundary(mask, width), mask & ~eroded.astype(bool))


def test_known_answers():
    gt = _square(10, 10)
    assert boundary_iou(gt, gt) == 1.0
    # one column to the right: the top and bottom rows overlap on 19 + 19 of the 76 + 76 ring pixels
    assert boundary_iou(gt, _square(10, 11)) == pytest.approx(38 / (76 + 76 - 38))
    assert boundary_iou(gt, _square(30, 30)) == 0.0
    assert boundary_iou(gt, np.zeros_like(gt)) == 0.0
    assert boundary_iou(np.zeros_like(gt), np.zeros_like(gt)) is None
    # mask IoU forgives an edge that boundary IoU does not: 20x20 against 20x19
    shaved = gt.copy()
    shaved[:, 29] = False
    mask_iou = (gt & shaved).sum() / (gt | shaved).sum()
    assert mask_iou == 0.95 and boundary_iou(gt, shaved) == pytest.approx(56 / (76 + 74 - 56))


def test_stats_sum_over_images_per_class_and_instances_keep_their_edges():
    stats = BoundaryStats(num_classes=2)
    gt = _square(10, 10)
    crop = Crop.from_dense(gt)  # the form predictions and ground truth are fed in
    stats.add([(1, crop)], [(1, crop)], gt.shape)  # 76 of 76
    stats.add([(1, crop)], [(2, crop)], gt.shape)  # class 1 missed, class 2 false
    report = stats.report(["a", "b"])
    assert report["per_class"] == {"a": pytest.approx(76 / 152), "b": 0.0}
    assert report["iou"] == pytest.approx(0.25) and report["dilation_ratio"] == 0.02

    left, right = _square(10, 10, 10), _square(10, 20, 10)  # two touching instances of one class
    touching = BoundaryStats(num_classes=1)
    touching.add([(1, Crop.from_dense(left)), (1, Crop.from_dense(right))], [(1, Crop.from_dense(left | right))],
                 left.shape)  # merged: the shared edge is lost
    assert touching.report(["a"])["per_class"]["a"] == pytest.approx(56 / 72)  # ring of the merged box, all in the truth
    assert BoundaryStats(num_classes=1).report(["a"]) == {"iou": None, "per_class": {"a": None}, "dilation_ratio": 0.02}
