"""InstanceMasks: box-sized crops give the same full masks, areas and COCO RLEs as full-size masks."""
from __future__ import annotations

import numpy as np

from segkit.evaluation.coco import encode_mask
from segkit.structures.masks import Crop, InstanceMasks


def test_rle_from_a_crop_is_pycocotools_encoding_of_the_full_mask():
    rng = np.random.default_rng(0)
    for _ in range(500):  # crops anywhere, of any fill, touching edges, as tall as the image, empty
        height, width = (int(v) for v in rng.integers(1, 25, 2))
        h, w = int(rng.integers(0, height + 1)), int(rng.integers(0, width + 1))
        y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        crop = rng.random((h, w)) < rng.random()
        full = np.zeros((height, width), dtype=bool)
        full[y0:y0 + h, x0:x0 + w] = crop
        masks = InstanceMasks([Crop(x0, y0, crop)], height, width)
        assert masks.rle(0) == encode_mask(full)
        np.testing.assert_array_equal(masks.dense(0), full)
        assert masks.areas().tolist() == [full.sum()]
        assert InstanceMasks.from_dense(full[None]).rle(0) == encode_mask(full)


def test_full_size_masks_round_trip_and_select_keeps_the_order():
    masks = np.zeros((3, 6, 8), dtype=bool)
    masks[0, 1:3, 2:5] = True
    masks[2, :, 7] = True  # masks[1] stays empty
    compact = InstanceMasks.from_dense(masks)
    np.testing.assert_array_equal(compact.dense(), masks)
    assert compact.crops[0].x0 == 2 and compact.crops[0].mask.shape == (2, 3)  # cut to what it touches
    np.testing.assert_array_equal(compact.select([2, 0]).dense(), masks[[2, 0]])
    assert compact.areas().tolist() == [6, 0, 6]
