"""segkit predict: every output file, skipping finished images, and Label Studio tasks that read back."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.helpers import SAMPLE, write_subset
from segkit.models.checkpoint import model_version
from segkit.cli import main
from segkit.evaluation.coco import image_entry
from segkit.labelstudio.preannotations import mask_to_polygons, to_labelstudio
from segkit.structures.prediction import Prediction
from segkit.data.readers import load_dataset


# A random-init model always fills torchvision's 100 detection slots, and the mask head on 100 boxes
# dominates CPU time; 10 keep every code path.
FAST = ["--max-detections", "10"]


@pytest.fixture(scope="module")
def predicted(untrained_checkpoint, tmp_path_factory) -> dict:
    """Two sample val images predicted in one batch, with custom Label Studio tag names.

    A random-init model (any model works here) at threshold 0.05 returns overlapping instances
    with holes and specks: hard cases for the exports.
    """
    data = write_subset(SAMPLE / "val", tmp_path_factory.mktemp("predict") / "data", 2, splits=("val",))
    images = data / "val" / "images"
    out = data.parent / "out"
    rc = main(["predict", *FAST, "--checkpoint", str(untrained_checkpoint), "--out", str(out), "--score-threshold", "0.05",
               "--batch-size", "2", "--from-name", "tag", "--to-name", "img", str(images)])
    assert rc == 0
    return {"images": images, "out": out, "checkpoint": untrained_checkpoint}


def _accepted(tasks_file: Path, dst: Path) -> Path:
    """The tasks as Label Studio exports them once an annotator submits the pre-annotations unchanged."""
    tasks = json.loads(tasks_file.read_text())
    for i, task in enumerate(tasks, start=1):
        task["id"] = i
        task["annotations"] = [{"id": i, "result": task["predictions"][0]["result"]}]
    dst.write_text(json.dumps(tasks))
    return dst


def _reread(tasks_file: Path, images: Path, tmp_path: Path) -> dict[str, list]:
    """Instances per image name, read back through segkit's own Label Studio JSON reader."""
    ds = load_dataset(_accepted(tasks_file, tmp_path / "accepted.json"), fmt="labelstudio-json", images_dir=images)
    return {Path(im.path).name: im for im in ds.images}


def _predicted_masks(out: Path) -> dict[str, list[np.ndarray]]:
    coco = json.loads((out / "predictions.json").read_text())
    names = {im["id"]: Path(im["file_name"]).name for im in coco["images"]}
    masks: dict[str, list[np.ndarray]] = {n: [] for n in names.values()}
    for ann in coco["annotations"]:
        masks[names[ann["image_id"]]].append(mask_utils.decode(ann["segmentation"]).astype(bool))
    return masks


def _instance_unions(record) -> dict[int, np.ndarray]:
    """Re-read regions grouped by the instance they came from (region ids are ``i<k>`` or ``i<k>p<part>``)."""
    groups: dict[int, np.ndarray] = {}
    for inst in record.instances:
        k = int(inst.ann_id[1:].split("p")[0])
        mask = inst.mask(record.height, record.width).astype(bool)
        groups[k] = groups[k] | mask if k in groups else mask
    return groups


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _has_holes(mask: np.ndarray) -> bool:
    _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0][:, 3] >= 0).any())


def test_predict_writes_every_file(predicted):
    out, images = predicted["out"], sorted(predicted["images"].iterdir())
    coco = json.loads((out / "predictions.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["leaf", "pebble", "shell"]
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    assert [Path(im["file_name"]).name for im in coco["images"]] == [p.name for p in images]
    assert coco["annotations"], "a random-init model at 0.05 returns detections"
    per_image = [sum(a["image_id"] == im["id"] for a in coco["annotations"]) for im in coco["images"]]
    assert max(per_image) == 10  # --max-detections: the random model would fill 100 slots
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    for ann in coco["annotations"][:20]:
        assert {"id", "image_id", "category_id", "segmentation", "bbox", "area", "score"} <= set(ann)
        mask = mask_utils.decode(ann["segmentation"])
        assert mask.shape == sizes[ann["image_id"]] and int(mask.sum()) == ann["area"]
        assert len(ann["bbox"]) == 4 and 0.05 <= ann["score"] <= 1
    for path, im in zip(images, coco["images"]):
        with Image.open(out / "overlays" / f"{path.stem}.png") as overlay:
            assert overlay.size == (im["width"], im["height"])
        ids = np.asarray(Image.open(out / "masks" / f"{path.stem}.png"))
        assert ids.shape == (im["height"], im["width"])
        assert ids.max() <= sum(a["image_id"] == im["id"] for a in coco["annotations"])

    tasks = json.loads((out / "labelstudio.json").read_text())
    assert [Path(t["data"]["image"]).name for t in tasks] == [p.name for p in images]
    pred = tasks[0]["predictions"][0]
    assert pred["model_version"] == model_version(predicted["checkpoint"])  # what the ML backend calls it too
    assert 0 < pred["score"] <= 1
    item = pred["result"][0]
    assert item["type"] == "polygonlabels" and (item["from_name"], item["to_name"]) == ("tag", "img")
    size = (coco["images"][0]["width"], coco["images"][0]["height"])
    assert (item["original_width"], item["original_height"], item["image_rotation"]) == (*size, 0)
    assert item["value"]["polygonlabels"][0] in {"leaf", "pebble", "shell"} and 0 < item["score"] <= 1
    assert all(0 <= v <= 100 for point in item["value"]["points"] for v in point)


def test_rerun_skips_done_images(predicted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(predicted["out"], out)
    records = sorted((out / "records").glob("*.json"))
    before = {p: p.stat().st_mtime_ns for p in records}

    import segkit.inference.predictor

    def no_model(*_):
        raise AssertionError("a finished folder must not build the model")

    with monkeypatch.context() as m:
        m.setattr(segkit.inference.predictor, "model_from_checkpoint", no_model)
        args = ["predict", *FAST, "--checkpoint", str(predicted["checkpoint"]), "--out", str(out), "--score-threshold", "0.05"]
        assert main([*args, str(predicted["images"])]) == 0
    assert "2 of 2 images already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in records} == before

    # An interrupted run left one image without its record: only that one is predicted again.
    records[0].unlink()
    import segkit.inference.predict_files

    todo = []
    monkeypatch.setattr(segkit.inference.predict_files, "predict_images", lambda predictor, images, *a, **k: todo.extend(images) or [])
    assert main([*args, str(predicted["images"])]) == 0
    assert [name for _, name in todo] == [records[0].stem]
    coco = json.loads((out / "predictions.json").read_text())
    assert [Path(im["file_name"]).stem for im in coco["images"]] == [records[1].stem]  # the skipped one is kept


def test_labelstudio_polygons_read_back(predicted, tmp_path):
    reread = _reread(predicted["out"] / "labelstudio.json", predicted["images"], tmp_path)
    for name, masks in _predicted_masks(predicted["out"]).items():
        unions = _instance_unions(reread[name])
        for k, mask in enumerate(masks):
            back = unions.get(k, np.zeros_like(mask))
            # Polygons have no holes: a holed mask comes back filled, everything else as it was.
            assert (mask & back).sum() >= 0.9 * mask.sum(), (name, k)
            if not _has_holes(mask):
                assert _iou(mask, back) >= 0.9, (name, k)


def test_labelstudio_brush_reads_back(predicted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(predicted["out"], out)
    assert main(["predict", *FAST, "--checkpoint", str(predicted["checkpoint"]), "--out", str(out),
                 "--score-threshold", "0.05", "--ls-brush", str(predicted["images"])]) == 0
    tasks = json.loads((out / "labelstudio.json").read_text())
    assert {r["type"] for t in tasks for r in t["predictions"][0]["result"]} == {"brushlabels"}
    reread = _reread(out / "labelstudio.json", predicted["images"], tmp_path)
    for name, masks in _predicted_masks(out).items():
        unions = _instance_unions(reread[name])
        assert len(unions) == len(masks)
        for k, mask in enumerate(masks):
            assert _iou(mask, unions[k]) == 1.0, (name, k)


def test_ground_truth_shapes_survive_polygon_export(tmp_path):
    """Real object shapes (the sample's annotations) come back from polygon tasks with IoU >= 0.9."""
    ds = load_dataset(SAMPLE / "val" / "result.json")
    entries, truth = [], {}
    for im in ds.images[:6]:
        masks = np.stack([i.mask(im.height, im.width).astype(bool) for i in im.instances]) if im.instances \
            else np.zeros((0, im.height, im.width), bool)
        labels = np.array([ds.classes.index(i.label) + 1 for i in im.instances], np.int64)
        pred = Prediction(np.array([i.bbox for i in im.instances], np.float32).reshape(-1, 4), labels,
                          [i.label for i in im.instances], np.ones(len(labels), np.float32), masks)
        entries.append(image_entry(str(im.path), im.width, im.height, pred))
        truth[Path(im.path).name] = masks
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps(to_labelstudio(entries, "gt")))
    reread = _reread(tasks, SAMPLE / "val" / "images", tmp_path)
    for name, masks in truth.items():
        unions = _instance_unions(reread[name])
        assert len(unions) == len(masks)
        assert all(_iou(m, unions[k]) >= 0.9 for k, m in enumerate(masks)), name


def test_polygons_follow_pixel_edges():
    yy, xx = np.mgrid[:60, :80]
    shapes = {
        "rectangle": (xx >= 10) & (xx < 30) & (yy >= 5) & (yy < 25),
        "L": ((xx >= 40) & (xx < 70) & (yy >= 40) & (yy < 45)) | ((xx >= 40) & (xx < 45) & (yy >= 10) & (yy < 45)),
        "pixel": (xx == 79) & (yy == 59),
        "disc": (xx - 40) ** 2 + (yy - 30) ** 2 < 15 ** 2,
    }
    for name, mask in shapes.items():
        polygons = mask_to_polygons(mask)
        back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 60, 80))).astype(bool)
        assert _iou(back, mask) >= (0.99 if name == "disc" else 1.0), name
    two = shapes["rectangle"] | ((xx >= 50) & (xx < 60) & (yy >= 50) & (yy < 60))
    assert len(mask_to_polygons(two)) == 2
    speck = shapes["rectangle"] | ((xx == 70) & (yy == 5))  # 1 pixel next to 400: dropped
    assert len(mask_to_polygons(speck)) == 1
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []


def test_sources_names_and_errors(tmp_path, untrained_checkpoint):
    from segkit.inference.predict_files import find_images, unique_names

    for rel in ("a/img.jpg", "b/img.jpg", "b/img.png", "b/deep/other.jpg", "b/notes.txt", "out/overlays/img.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = find_images([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "*" / "img.jpg")],
                        exclude=tmp_path / "out")
    assert [p.relative_to(tmp_path).as_posix() for p, _ in found] == \
        ["a/img.jpg", "b/img.jpg", "b/img.png", "b/deep/other.jpg"]
    assert [ref for _, ref in found] == ["img.jpg", "img.jpg", "img.png", "deep/other.jpg"]
    assert [ref for _, ref in find_images([str(tmp_path / "*" / "img.jpg")])] == ["a/img.jpg", "b/img.jpg"]
    assert unique_names([p for p, _ in found]) == ["img", "img_jpg", "img_png", "other"]
    assert unique_names([tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "c" / "b" / "x.jpg"]) == \
        ["a__x", f"{tmp_path.name}__b__x", "c__b__x"]
    assert main(["predict", *FAST, "--checkpoint", str(untrained_checkpoint), "--out", str(tmp_path / "o"),
                 str(tmp_path / "missing")]) == 2


def test_an_hf_checkpoint_is_downloaded_from_the_hub(hub_downloads, untrained_checkpoint, tmp_path, capsys):
    """``--checkpoint hf://owner/repo/path.pt`` goes through segkit.models.checkpoint.resolve_checkpoint, as the
    demo's does: the file comes from the Hub's cache, and the outputs are those of that file."""
    image = sorted((SAMPLE / "val" / "images").iterdir())[0]
    out = tmp_path / "out"
    assert main(["predict", *FAST, "--checkpoint", "hf://someone/leaves/runs/exp/best.pt", "--out", str(out),
                 str(image)]) == 0
    assert hub_downloads == [("someone/leaves", "runs/exp/best.pt")]
    tasks = json.loads((out / "labelstudio.json").read_text())
    assert tasks[0]["predictions"][0]["model_version"] == model_version(untrained_checkpoint)
    assert main(["predict", *FAST, "--checkpoint", "hf://someone/leaves", "--out", str(out), str(image)]) == 2
    assert "expected hf://owner/repo/path/to/file.pt" in capsys.readouterr().err
