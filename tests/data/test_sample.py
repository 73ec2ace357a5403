"""The committed sample (data/sample) is what utils/make_sample.py writes, and reads back as generated."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from label_studio_converter.brush import decode_rle
from pycocotools import mask as mask_utils
from tests.helpers import REPO

SAMPLE = REPO / "data" / "sample"


def _load_make_sample():
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "utils" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_sample = _load_make_sample()


@pytest.fixture(scope="module")
def generated():
    """{name: (image, [(class, mask)])} of a fresh generation (generated once for this module)."""
    return {name: (image, instances) for name, image, instances in make_sample.generate(0)}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / (a | b).sum())


def _name(file_name: str) -> str:
    """'images/1a2b3c4d-img_0001.jpg' or '/data/upload/1/1a2b3c4d-img_0001.jpg' -> 'img_0001'."""
    return re.fullmatch(r"[0-9a-f]{8}-(img_\d{4})\.jpg", Path(file_name).name).group(1)


def _boxes_overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_committed_sample_is_reproducible(tmp_path, generated):
    samples = [(name, image, instances) for name, (image, instances) in generated.items()]
    make_sample.write(tmp_path, seed=0, samples=samples)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(SAMPLE) for p in SAMPLE.rglob("*") if p.is_file() and p.name != "README.md")
    assert fresh == committed, "file lists differ: re-run `python utils/make_sample.py`"
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (SAMPLE / rel).read_bytes(), f"{rel} differs from a fresh write"


def test_sample_contents():
    total_bytes = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total_bytes < 4_000_000
    assert (SAMPLE / "README.md").is_file()
    counts, empty, overlapping, classes = {}, 0, 0, set()
    for split in ("train", "val"):
        coco = json.loads((SAMPLE / split / "result.json").read_text())
        counts[split] = len(coco["images"])
        assert [c["name"] for c in coco["categories"]] == sorted(c["name"] for c in coco["categories"])
        assert [c["id"] for c in coco["categories"]] == list(range(len(coco["categories"])))
        assert [im["id"] for im in coco["images"]] == list(range(len(coco["images"])))
        assert coco["info"]["contributor"] == "Label Studio"
        classes |= {c["name"] for c in coco["categories"]}
        annotated = {a["image_id"] for a in coco["annotations"]}
        empty += sum(im["id"] not in annotated for im in coco["images"])
        for im in coco["images"]:
            assert 256 <= im["width"] <= 512 and 256 <= im["height"] <= 512
            assert im["file_name"].startswith("images/") and (SAMPLE / split / im["file_name"]).is_file()
            _name(im["file_name"])
        for a in coco["annotations"]:
            assert set(a) == {"id", "image_id", "category_id", "segmentation", "bbox", "ignore", "iscrowd", "area"}
        tasks = json.loads((SAMPLE / split / "tasks.json").read_text())
        assert len(tasks) == len(coco["images"])
        results = [r for t in tasks for r in t["annotations"][0]["result"]]
        assert len(results) == len(coco["annotations"])
        brushes = sum(r["type"] == "brushlabels" for r in results)
        assert 0.1 <= brushes / len(results) <= 0.3
        for t in tasks:
            assert t["data"]["image"].startswith("/data/upload/") and t["predictions"] == []
        overlapping += sum(_boxes_overlap(a["bbox"], b["bbox"]) for a in coco["annotations"]
                           for b in coco["annotations"] if a["image_id"] == b["image_id"] and a["id"] < b["id"])
    assert 70 <= counts["train"] <= 90 and 15 <= counts["val"] <= 25
    assert overlapping >= 20, "too few overlapping objects to exercise occlusion"
    assert len(classes) >= 3 and 3 <= empty <= 5


def test_exports_reproduce_generated_masks(generated):
    """Without segkit.data.readers: rasterise result.json polygons and decode tasks.json regions directly."""
    for split in ("train", "val"):
        coco = json.loads((SAMPLE / split / "result.json").read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        by_image = {im["id"]: [] for im in coco["images"]}
        for a in coco["annotations"]:
            by_image[a["image_id"]].append(a)
        for im in coco["images"]:
            _, instances = generated[_name(im["file_name"])]
            anns = by_image[im["id"]]
            assert [names[a["category_id"]] for a in anns] == [cls for cls, _ in instances]
            for a, (_, mask) in zip(anns, instances):
                drawn = mask_utils.decode(mask_utils.frPyObjects(a["segmentation"], im["height"], im["width"]))[..., 0]
                assert _iou(drawn, mask) >= 0.95
        for task in json.loads((SAMPLE / split / "tasks.json").read_text()):
            _, instances = generated[_name(task["data"]["image"])]
            results = task["annotations"][0]["result"]
            assert len(results) == len(instances)
            for r, (cls, mask) in zip(results, instances):
                h, w = r["original_height"], r["original_width"]
                if r["type"] == "brushlabels":
                    assert r["value"]["brushlabels"] == [cls]
                    drawn = decode_rle(r["value"]["rle"]).reshape(h, w, 4)[..., 3] > 0
                    assert np.array_equal(drawn, mask.astype(bool))
                else:
                    assert r["value"]["polygonlabels"] == [cls]
                    flat = [c for x, y in r["value"]["points"] for c in (x * w / 100, y * h / 100)]
                    drawn = mask_utils.decode(mask_utils.frPyObjects([flat], h, w))[..., 0]
                    assert _iou(drawn, mask) >= 0.95


@pytest.mark.parametrize("export", ["result.json", "tasks.json"])
def test_readers_round_trip(export, generated):
    """Generated masks -> Label Studio export -> segkit.data.readers -> the same instances (IoU >= 0.95)."""
    from segkit.data import readers
    for split in ("train", "val"):
        records = readers.load_dataset(SAMPLE / split / export)
        assert not [p for p in records.problems if p.fatal]
        n_train = make_sample.SPLITS[0][1]
        assert len(records.images) == sum((split == "train") == (int(name[4:]) <= n_train) for name in generated)
        for rec in records.images:
            image, instances = generated[_name(rec.path.name)]
            assert (rec.height, rec.width) == image.shape[:2]
            assert len(rec.instances) == len(instances), rec.path
            unmatched = list(rec.instances)
            for cls, mask in instances:  # best same-class match: readers need not keep the order
                ious = [(_iou(inst.mask(rec.height, rec.width), mask), k)
                        for k, inst in enumerate(unmatched) if inst.label == cls]
                assert ious, f"{rec.path}: no {cls} read back"
                best, k = max(ious)
                assert best >= 0.95, f"{rec.path}: {cls} IoU {best:.3f}"
                unmatched.pop(k)
