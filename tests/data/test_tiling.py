"""Tiled training (segkit.data.tiling, ``--train-tiles``): crops at native resolution whose masks are exactly the
full masks cut there, objects kept only when enough of them is inside, crops placed on objects."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from segkit.data.dataset import SegmentationDataset
from segkit.data.records import ImageRecord, Instance
from segkit.data.tiling import MIN_VISIBLE, crop_generator, crop_instances, random_window
from segkit.data.transforms import build_transform


def _polygon(rng: np.random.Generator, width: int, height: int) -> list[float]:
    """A random star-shaped polygon, often crossing the image's edge (its points clipped to the image)."""
    n, cx, cy, r = rng.integers(3, 12), rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, 200)
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.3, 1, n)
    xs, ys = np.clip(cx + radii * np.cos(angles), 0, width), np.clip(cy + radii * np.sin(angles), 0, height)
    return np.stack([xs, ys], 1).ravel().tolist()


def _instance(segmentation, width: int, height: int, label: str = "car") -> Instance:
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)) if isinstance(segmentation, list) \
        else segmentation
    x, y, w, h = mask_utils.toBbox(rle)
    return Instance(label, segmentation, (float(x), float(y), float(x + w), float(y + h)))


def test_a_crop_of_polygons_and_rles_is_the_full_mask_cut_there():
    rng = np.random.default_rng(0)
    width, height = 500, 300
    for _ in range(200):
        polygon = _instance([_polygon(rng, width, height)], width, height)
        rle = _instance(mask_utils.encode(np.asfortranarray(polygon.mask(height, width))), width, height)
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        window = (x0, y0, int(rng.integers(x0 + 20, width + 1)), int(rng.integers(y0 + 20, height + 1)))
        full = polygon.mask(height, width)[window[1]:window[3], window[0]:window[2]]
        assert np.array_equal(polygon.mask_in(window, height, width), full)
        assert np.array_equal(rle.mask_in(window, height, width), full)
        assert polygon.area(height, width) == polygon.mask(height, width).sum() == rle.area(height, width)


def test_objects_cut_by_the_crop_stay_when_enough_of_them_is_inside():
    width, height = 400, 200
    mostly_in = _instance([[90, 50, 130, 50, 130, 90, 90, 90]], width, height)  # 40 x 40, 30 of its 40 columns in
    sliver = _instance([[115, 120, 155, 120, 155, 160, 115, 160]], width, height)  # 5 of its 40 columns in
    outside = _instance([[300, 10, 340, 10, 340, 50, 300, 50]], width, height)
    kept, masks = crop_instances([mostly_in, sliver, outside], (0, 0, 120, 200), width, height)
    assert kept == [mostly_in] and masks.shape == (1, 200, 120)
    assert np.array_equal(masks[0], mostly_in.mask(height, width)[:, :120])
    assert masks[0].sum() >= MIN_VISIBLE * mostly_in.area(height, width)


def _scene(tmp_path, width: int = 2000, height: int = 1500,
           cars: tuple[tuple[int, int], ...] = ((200, 150), (1500, 300), (900, 1200))) -> ImageRecord:
    """A large photo with small cars far apart."""
    image = Image.new("RGB", (width, height), (80, 90, 80))
    instances = []
    for k, (x, y) in enumerate(cars):
        ImageDraw.Draw(image).rectangle((x, y, x + 30, y + 20), fill=(200, 40 * k, 40))
        instances.append(_instance([[x, y, x + 31, y, x + 31, y + 21, x, y + 21]], width, height))
    image.save(tmp_path / "aerial.png")
    return ImageRecord(tmp_path / "aerial.png", width, height, instances)


def test_the_dataset_gives_tiles_whose_targets_are_the_full_masks_cut_there(tmp_path):
    record = _scene(tmp_path)
    dataset = SegmentationDataset([record], ["car"], build_transform("none", train=False), tile=256)
    full = np.stack([inst.mask(record.height, record.width) for inst in record.instances])
    photo = np.asarray(Image.open(record.path).convert("RGB"))
    on_a_car = 0
    for seed in range(40):
        x0, y0, x1, y1 = random_window(record.instances, record.width, record.height, 256, crop_generator(seed, 0))
        dataset.set_epoch(seed)
        torch.manual_seed(1000 + seed)  # the global stream (what a resume restores) does not move the crop
        image, target = dataset[0]
        assert image.shape == (3, 256, 256)
        assert np.array_equal((image.permute(1, 2, 0).numpy() * 255).round(), photo[y0:y1, x0:x1])
        inside = [m[y0:y1, x0:x1] for m in full if m[y0:y1, x0:x1].sum() >= MIN_VISIBLE * m.sum()]
        assert len(target["masks"]) == len(inside)
        assert all(np.array_equal(t.numpy(), m) for t, m in zip(target["masks"], inside))
        on_a_car += len(inside) > 0
    assert on_a_car >= 0.6 * 40  # most crops are placed on an object (ON_OBJECT of them), a few anywhere


def test_an_image_smaller_than_a_tile_is_used_whole(tmp_path):
    record = _scene(tmp_path, 200, 150, cars=((50, 40),))
    image, target = SegmentationDataset([record], ["car"], tile=512)[0]
    assert image.shape == (3, 150, 200) and len(target["masks"]) == 1


@pytest.mark.slow
def test_tiled_training_validates_tile_by_tile_and_records_its_scale(tmp_path):
    """A run with --train-tiles: training crops, val predicted in tiles, and the checkpoint's train_side set so
    that ``--tile auto`` cuts the same tiles."""
    from segkit.engine.trainer import train
    from segkit.models.checkpoint import load_checkpoint
    from tests.helpers import SAMPLE, tiny_config, write_subset

    data = write_subset(SAMPLE / "train", tmp_path / "data", 4)
    summary = train(tiny_config(data, tmp_path / "run", train_tiles=256, epochs=1))
    best = load_checkpoint(summary["best"])
    assert best["train_side"] == 256 and best["config"]["train_tiles"] == 256
    assert "val_segm_map" in best["metrics"]


def test_train_tiles_are_refused_for_semantic_models(tmp_path):
    from segkit.engine.config import TrainConfig, TrainingStopped, resolve_model

    with pytest.raises(TrainingStopped, match="--train-tiles is for instance models"):
        resolve_model(TrainConfig(data=str(tmp_path), task="semantic", train_tiles=256))
