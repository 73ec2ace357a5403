"""Augmentation presets: boxes follow masks, labels follow masks, negatives stay valid, dtypes are exact."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from segkit.data.transforms import PRESETS, build_transform, masks_to_boxes

# each instance is painted in a pure primary colour and labelled by it: label k <-> channel k - 1,
# so after any augmentation the pixels under an output mask must still be dominated by that channel
COLOURS = {1: (230, 20, 20), 2: (20, 230, 20), 3: (20, 20, 230)}


def _sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sample-like image: grey background, 0-3 ellipses (later ones occlude earlier ones)."""
    h, w = (int(v) for v in rng.integers(256, 513, 2))
    image = np.full((h, w, 3), int(rng.integers(60, 200)), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    labels = rng.permutation([1, 2, 3])[: int(rng.integers(0, 4))]
    masks = []
    for label in labels:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(15, h / 3), rng.uniform(15, w / 3)
        mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
        masks = [m & (1 - mask) for m in masks] + [mask]  # visible parts only
        image[mask.astype(bool)] = COLOURS[int(label)]
    keep = [m.sum() > 0 for m in masks]
    masks = np.array([m for m, k in zip(masks, keep) if k], np.uint8).reshape(-1, h, w)
    return image, masks, np.asarray(labels, np.int64)[keep]


def _check_output(image: torch.Tensor, target: dict, image_id: int) -> None:
    assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    h, w = image.shape[1:]
    assert set(target) == {"boxes", "labels", "masks", "image_id", "area", "iscrowd"}
    n = len(target["labels"])
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
    assert target["labels"].dtype == torch.int64 and target["labels"].shape == (n,)
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n, h, w)
    assert target["area"].dtype == torch.float32 and target["area"].shape == (n,)
    assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].shape == (n,)
    assert isinstance(target["image_id"], int) and target["image_id"] == image_id
    masks = target["masks"].numpy()
    assert set(np.unique(masks)) <= {0, 1}
    for k in range(n):
        m = masks[k].astype(bool)
        assert m.sum() >= 16, "an empty or tiny mask was kept"
        assert float(target["area"][k]) == m.sum()
        rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        tight = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
        assert np.abs(target["boxes"][k].numpy() - tight).max() <= 1, "box does not match its mask"
        mean = image[:, torch.from_numpy(m)].mean(1)  # mean colour under the mask
        assert int(mean.argmax()) == int(target["labels"][k]) - 1, "label no longer matches its mask"


@pytest.mark.parametrize("preset", PRESETS)
def test_boxes_and_labels_follow_masks(preset):
    rng = np.random.default_rng(PRESETS.index(preset))
    transform = build_transform(preset, seed=0)
    kept = dropped = 0
    for i in range(50):  # 4 presets x 50 = 200 augmented samples
        image, masks, labels = _sample(rng)
        out_image, target = transform(image, masks, labels, image_id=i)
        _check_output(out_image, target, i)
        kept += len(target["labels"])
        dropped += len(labels) - len(target["labels"])
        if len(labels) == 0:
            assert target["boxes"].shape == (0, 4) and target["masks"].shape[0] == 0
    assert kept > 40
    if preset in ("none", "light"):
        assert dropped == 0  # nothing moves out of the frame


def test_negative_image_keeps_exact_shapes():
    image = np.full((300, 420, 3), 128, np.uint8)
    for preset in PRESETS:
        out, target = build_transform(preset, seed=1)(image, np.zeros((0, 300, 420), np.uint8), [], image_id=7)
        _check_output(out, target, 7)
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert target["masks"].shape == (0, *out.shape[1:])


def test_none_preset_is_exact():
    rng = np.random.default_rng(5)
    image, masks, labels = _sample(rng)
    while len(labels) == 0:
        image, masks, labels = _sample(rng)
    out, target = build_transform("none")(image, masks, labels)
    assert torch.equal(out, torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert np.array_equal(target["masks"].numpy(), masks)
    assert target["labels"].tolist() == labels.tolist()
    # eval mode is the plain conversion, whatever the preset
    out2, target2 = build_transform("heavy", train=False)(image, masks, labels)
    assert torch.equal(out, out2) and torch.equal(target["boxes"], target2["boxes"])


def test_crop_drops_slivers_with_their_labels():
    image = np.zeros((200, 200, 3), np.uint8)
    masks = np.zeros((2, 200, 200), np.uint8)
    masks[0, 90:110, 0:3] = 1  # 60 px at the left border: a crop leaves < 20% of it
    masks[1, 80:120, 80:120] = 1  # centre: always survives
    transform = build_transform("default", seed=0)
    for _ in range(30):
        _, target = transform(image, masks, [1, 2])
        assert 2 in target["labels"].tolist()
        if len(target["labels"]) == 1:
            assert target["labels"].tolist() == [2] and target["masks"][0].sum() == 1600


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_transform("extreme")
    for name in PRESETS:
        assert name in str(err.value)


def test_mismatched_labels_raise():
    with pytest.raises(ValueError, match="masks"):
        build_transform("none")(np.zeros((10, 10, 3), np.uint8), np.zeros((2, 10, 10), np.uint8), [1])


def test_masks_to_boxes_is_tight_and_exclusive():
    masks = np.zeros((2, 10, 12), np.uint8)
    masks[0, 2:5, 3:7] = 1
    masks[1, 9, 11] = 1
    assert masks_to_boxes(masks).tolist() == [[3, 2, 7, 5], [11, 9, 12, 10]]
    assert masks_to_boxes(np.zeros((0, 10, 12), np.uint8)).shape == (0, 4)


def test_seed_repeats_and_workers_differ(monkeypatch):
    rng = np.random.default_rng(3)
    image, masks, labels = _sample(rng)
    a = build_transform("heavy", seed=4)(image, masks, labels)[0]
    b = build_transform("heavy", seed=4)(image, masks, labels)[0]
    assert torch.equal(a, b)
    # inside DataLoader workers the transform reseeds from the worker's own seed
    outs = []
    for seed in (11, 12):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda s=seed: SimpleNamespace(seed=s))
        outs.append(build_transform("heavy", seed=4)(image, masks, labels)[0])
    assert outs[0].shape != outs[1].shape or not torch.equal(outs[0], outs[1])
