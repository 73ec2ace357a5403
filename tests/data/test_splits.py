"""splits: the export's own split when it has one, else a deterministic stratified split; saved splits restored."""
from __future__ import annotations

from pathlib import Path

import pytest

from segkit.data.records import ImageRecord, Instance
from segkit.data.splits import SPLITS, SplitError, restore_split, split_paths, split_records


def _image(name: str, *labels: str, split: str | None = None, root: Path = Path("/data")) -> ImageRecord:
    instances = [Instance(label, [[0, 0, 4, 0, 4, 4]], (0, 0, 4, 4)) for label in labels]
    return ImageRecord(root / "images" / f"{name}.jpg", 8, 8, instances, image_id=name, split=split)


def _dataset(root: Path = Path("/data")) -> list[ImageRecord]:
    """13 images: "common" in 11, "few" in 3, "once" in a single image (twice there), 2 negatives."""
    images = [_image(f"c{i}", "common", root=root) for i in range(7)]
    images += [_image(f"f{i}", "common", "few", root=root) for i in range(3)]
    images += [_image("o", "common", "once", "once", root=root), _image("neg0", root=root),
               _image("neg1", root=root)]
    return images


def _labels(images: list[ImageRecord]) -> set[str]:
    return {inst.label for im in images for inst in im.instances}


def test_random_split_is_a_deterministic_partition_of_the_requested_sizes():
    images = _dataset()
    splits = split_records(images, val_frac=0.2, test_frac=0.2, seed=3)
    assert list(splits) == list(SPLITS)
    names = [im.image_id for s in SPLITS for im in splits[s]]
    assert sorted(names) == sorted(im.image_id for im in images)  # every image exactly once
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (7, 3, 3)  # round(13 * 0.2) = 3
    again = split_records(list(reversed(images)), val_frac=0.2, test_frac=0.2, seed=3)
    assert {s: [im.image_id for im in v] for s, v in again.items()} == \
        {s: [im.image_id for im in v] for s, v in splits.items()}  # input order does not matter
    other = [split_records(images, 0.2, 0.2, seed) for seed in range(4, 10)]
    assert any([im.image_id for im in o["val"]] != [im.image_id for im in splits["val"]] for o in other)


@pytest.mark.parametrize("seed", range(5))
def test_every_class_with_images_to_spare_reaches_val_and_test_and_a_single_image_class_stays_in_train(seed):
    splits = split_records(_dataset(), val_frac=0.2, test_frac=0.2, seed=seed)
    assert {"common", "few"} <= _labels(splits["val"])
    assert {"common", "few"} <= _labels(splits["test"])
    assert "few" in _labels(splits["train"])  # 3 images: one each for val and test, one left to learn from
    assert "once" in _labels(splits["train"])  # a class seen once cannot be validated on: it is trained on
    assert "once" not in _labels(splits["val"]) | _labels(splits["test"])


def test_small_datasets_keep_one_held_out_image_per_requested_split():
    images = _dataset()[:3]
    splits = split_records(images, val_frac=0.05, test_frac=0.05, seed=0)
    assert [len(splits[s]) for s in SPLITS] == [1, 1, 1]
    splits = split_records(images, val_frac=0.05, test_frac=0.0, seed=0)
    assert [len(splits[s]) for s in SPLITS] == [2, 1, 0]


def test_an_export_with_its_own_splits_is_used_as_is():
    images = [_image("a", "common", split="train"), _image("b", "common", split="val"), _image("c", "common"),
              _image("d", "common", split="test")]
    splits = split_records(images, val_frac=0.5, test_frac=0.5, seed=0)
    assert {s: [im.image_id for im in v] for s, v in splits.items()} == \
        {"train": ["a", "c"], "val": ["b"], "test": ["d"]}  # an image without a split trains


def test_a_saved_split_is_restored_and_a_missing_image_is_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    splits = split_records(_dataset(data), 0.2, 0.2, seed=0)
    saved = split_paths(splits, data)
    assert saved["val"][0].startswith("images/")  # relative to the dataset: it can move
    for root in (data, tmp_path / "moved"):  # records read again (new objects), in place and after a move
        root.mkdir(exist_ok=True)
        restored = restore_split(_dataset(root), saved, root)
        assert {s: [im.path.name for im in v] for s, v in restored.items()} == \
            {s: [im.path.name for im in v] for s, v in splits.items()}
    gone = [im for im in _dataset(data) if im.path.name != Path(saved["val"][0]).name]
    with pytest.raises(SplitError, match=saved["val"][0]):
        restore_split(gone, saved, data)
    absolute = {s: [str(im.path) for im in v] for s, v in splits.items()}  # what checkpoints saved before
    assert restore_split(_dataset(data), absolute, data).keys() == set(SPLITS)
