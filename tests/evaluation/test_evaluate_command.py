"""segkit evaluate: agrees with pycocotools run directly, scores perfect and empty predictions right."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.helpers import SAMPLE, write_subset
from segkit.cli import main
from segkit.evaluation.coco import image_entry, predictions_file
from segkit.structures.masks import Crop
from segkit.evaluation.metrics import BACKGROUND, PixelStats, evaluate_predictions, semantic_metrics
from segkit.engine.plots import plot_confusion_matrix, plot_pr_curves
from segkit.structures.prediction import Prediction
from segkit.data.readers import load_dataset
from segkit.data.records import ImageRecord, Instance
from segkit.data.splits import SplitError, select_split

CLASSES = ["leaf", "pebble", "shell"]


# A random-init model always fills torchvision's 100 detection slots, and the mask head on 100 boxes
# dominates CPU time; 10 keep every code path.
FAST = ["--max-detections", "10"]


@pytest.fixture(scope="module")
def evaluated(untrained_checkpoint, tmp_path_factory) -> dict:
    """Two sample val images: ``predict`` with every detection (threshold 0), then ``evaluate`` on them."""
    root = tmp_path_factory.mktemp("evaluate")
    data = write_subset(SAMPLE / "val", root / "data", 2, splits=("val",)) / "val"
    ckpt = str(untrained_checkpoint)
    assert main(["predict", *FAST, "--checkpoint", ckpt, "--out", str(root / "pred"), "--score-threshold", "0",
                 "--batch-size", "2", str(data / "images")]) == 0
    assert main(["evaluate", *FAST, "--checkpoint", ckpt, "--data", str(data), "--split", "all", "--batch-size", "2",
                 "--json", str(root / "metrics.json"), "--out", str(root / "plots")]) == 0
    return {"data": data, "pred": root / "pred", "metrics": json.loads((root / "metrics.json").read_text()),
            "plots": root / "plots"}


def _cocoeval(gt: dict, results: list[dict], iou_type: str) -> np.ndarray:
    coco_gt = COCO()
    coco_gt.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _export_gt(export_file: Path, coco: dict) -> dict:
    """The export's own COCO json renumbered like ``coco`` (a predictions.json): image ids by file
    name, category ids by class name, annotation ids from 1 (COCOeval stores the matched gt id, so
    Label Studio's id 0 would read as unmatched)."""
    export = json.loads(export_file.read_text())
    image_ids = {Path(im["file_name"]).name: im["id"] for im in coco["images"]}
    cat_ids = {c["name"]: c["id"] for c in coco["categories"]}
    names = {c["id"]: c["name"] for c in export["categories"]}
    images = {im["id"]: image_ids[Path(im["file_name"]).name] for im in export["images"]
              if Path(im["file_name"]).name in image_ids}
    return {"images": [{**im, "id": images[im["id"]]} for im in export["images"] if im["id"] in images],
            "categories": coco["categories"],
            "annotations": [{**a, "id": i, "image_id": images[a["image_id"]],
                             "category_id": cat_ids[names[a["category_id"]]]}
                            for i, a in enumerate((a for a in export["annotations"] if a["image_id"] in images),
                                                  start=1)]}


def _assert_same_ap(ours: dict, stats: np.ndarray) -> None:
    assert ours["AP"] == pytest.approx(max(stats[0], 0), abs=1e-12)
    assert ours["AP50"] == pytest.approx(max(stats[1], 0), abs=1e-12)
    assert ours["AP75"] == pytest.approx(max(stats[2], 0), abs=1e-12)
    assert ours["AP_small"] == (None if stats[3] < 0 else pytest.approx(stats[3], abs=1e-12))


def test_segm_ap_matches_cocoeval_on_predict_output(evaluated):
    """evaluate's AP equals COCOeval run by hand on predict's predictions.json and the export's own json."""
    pred = json.loads((evaluated["pred"] / "predictions.json").read_text())
    assert pred["annotations"], "the model returned detections to rank"
    gt = _export_gt(evaluated["data"] / "result.json", pred)
    _assert_same_ap(evaluated["metrics"]["segm"], _cocoeval(gt, pred["annotations"], "segm"))


def test_segm_ap_matches_cocoeval_on_imperfect_predictions():
    """The same agreement where AP is neither 0 nor 1: ground truth shifted, relabelled, dropped, plus
    false positives, written by predict's own COCO writer."""
    records = _val_records(10)
    rng = np.random.default_rng(0)
    predictions = [_jittered(r, rng) for r in records]
    ours = evaluate_predictions(records, predictions, CLASSES, threshold=0.5)
    coco = predictions_file([image_entry(str(r.path), r.width, r.height, p) for r, p in zip(records, predictions)], CLASSES)
    stats = _cocoeval(_export_gt(SAMPLE / "val" / "result.json", coco), coco["annotations"], "segm")
    assert 0.2 < stats[0] < 0.9
    _assert_same_ap(ours["segm"], stats)


def test_json_and_plots(evaluated):
    m = evaluated["metrics"]
    assert set(m) == {"bbox", "segm", "semantic", "boundary"}
    for iou_type in ("bbox", "segm"):
        assert set(m[iou_type]) == {"AP", "AP50", "AP75", "AP_small", "per_class", "pr_curves"}
        # precision at 101 recall points at IoU 0.5, for each class with ground truth: its mean is AP50
        assert set(m[iou_type]["pr_curves"]) == set(m[iou_type]["per_class"])
        assert all(len(curve) == 101 for curve in m[iou_type]["pr_curves"].values())
    assert set(m["semantic"]) == {"per_class", "mIoU", "mDice"}
    assert list(m["semantic"]["per_class"]) == [BACKGROUND, *CLASSES]
    for name, v in m["semantic"]["per_class"].items():
        assert set(v) == {"iou", "dice"}
    assert set(m["boundary"]) == {"iou", "per_class", "dilation_ratio"} and m["boundary"]["dilation_ratio"] == 0.02
    assert list(m["boundary"]["per_class"]) == CLASSES
    for png in ("confusion_matrix.png", "pr_curves.png"):
        assert (evaluated["plots"] / png).read_bytes()[:4] == b"\x89PNG"


def _val_records(n: int = 8) -> list[ImageRecord]:
    """The first ``n`` val images of the sample, objects and an empty image included."""
    images = load_dataset(SAMPLE / "val").images
    empty = [im for im in images if not im.instances][:1]
    return [im for im in images if im.instances][: n - len(empty)] + empty


def _as_prediction(record: ImageRecord, score: float = 1.0) -> Prediction:
    """The ground truth of one image, as if the model had predicted it."""
    n, shape = len(record.instances), (record.height, record.width)
    masks = np.stack([i.mask(*shape).astype(bool) for i in record.instances]) if n else np.zeros((0, *shape), bool)
    return Prediction(np.array([i.bbox for i in record.instances], np.float32).reshape(-1, 4),
                      np.array([CLASSES.index(i.label) + 1 for i in record.instances], np.int64),
                      [i.label for i in record.instances], np.full(n, score, np.float32), masks)


def _empty(record: ImageRecord) -> Prediction:
    return Prediction(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), [], np.zeros(0, np.float32),
                      np.zeros((0, record.height, record.width), bool))


def _jittered(record: ImageRecord, rng: np.random.Generator) -> Prediction:
    """Ground truth made imperfect: masks shifted by 0-8 px, some relabelled or missed, one false positive."""
    h, w = record.height, record.width
    masks, labels = [], []
    for inst in record.instances:
        if rng.random() < 0.1:
            continue
        dy, dx = rng.integers(-8, 9, 2)
        masks.append(np.roll(inst.mask(h, w).astype(bool), (dy, dx), axis=(0, 1)))
        swap = rng.random() < 0.15
        labels.append(int(rng.integers(1, 4)) if swap else CLASSES.index(inst.label) + 1)
    fp = np.zeros((h, w), bool)
    fp[h // 4: h // 2, w // 4: w // 2] = True
    masks.append(fp)
    labels.append(int(rng.integers(1, 4)))
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    scores = rng.uniform(0.05, 1, len(masks)).astype(np.float32)
    order = np.argsort(-scores)
    return Prediction(np.array(boxes, np.float32)[order], np.array(labels, np.int64)[order],
                      [CLASSES[labels[i] - 1] for i in order], scores[order], np.stack(masks)[order])


def test_perfect_prediction_scores_one():
    records = _val_records()
    m = evaluate_predictions(records, [_as_prediction(r) for r in records], CLASSES, threshold=0.5)
    for iou_type in ("bbox", "segm"):
        assert (m[iou_type]["AP"], m[iou_type]["AP50"], m[iou_type]["AP75"]) == (1.0, 1.0, 1.0)
        assert set(m[iou_type]["per_class"].values()) == {1.0}
    assert m["semantic"]["mIoU"] == 1.0 and m["semantic"]["mDice"] == 1.0
    assert all(v == {"iou": 1.0, "dice": 1.0} for v in m["semantic"]["per_class"].values())
    assert m["boundary"]["iou"] == 1.0 and set(m["boundary"]["per_class"].values()) == {1.0}


def test_empty_prediction_scores_zero(tmp_path):
    records = _val_records()
    m = evaluate_predictions(records, [_empty(r) for r in records], CLASSES, threshold=0.5)
    for iou_type in ("bbox", "segm"):
        assert (m[iou_type]["AP"], m[iou_type]["AP50"], m[iou_type]["AP75"]) == (0.0, 0.0, 0.0)
    assert m["semantic"]["mIoU"] == 0.0 and m["semantic"]["mDice"] == 0.0
    assert m["boundary"]["iou"] == 0.0
    assert 0 < m["semantic"]["per_class"][BACKGROUND]["iou"] < 1
    assert m["segm"]["pr_curves"] and set(m["segm"]["pr_curves"]) == set(m["segm"]["per_class"])
    assert all(max(c) == 0 for c in m["segm"]["pr_curves"].values())
    plot_pr_curves(m, tmp_path / "pr.png")
    plot_confusion_matrix(np.zeros((4, 4), np.int64), [BACKGROUND, *CLASSES], tmp_path / "cm.png")


def test_display_threshold_only_affects_pixel_metrics():
    """A perfect but unconfident prediction: full AP (ranking), no pixels above the threshold."""
    records = _val_records(3)
    m = evaluate_predictions(records, [_as_prediction(r, score=0.3) for r in records], CLASSES, threshold=0.5)
    assert m["segm"]["AP"] == 1.0
    assert m["semantic"]["mIoU"] == 0.0


def test_pixels_are_summed_over_the_split_not_averaged():
    """Class 1 right on 100 pixels of one image, missed on 10 of another: IoU 100/110, not mean(1, 0)."""
    stats = PixelStats(num_classes=2)
    big, small = np.zeros((10, 20), bool), np.zeros((10, 20), bool)
    big[:, :10] = True
    small[0, :10] = True
    big, small = Crop.from_dense(big), Crop.from_dense(small)
    stats.add([(1, big)], [(1, big)], (10, 20))
    stats.add([(1, small)], [(2, small)], (10, 20))  # predicted as class 2
    m = semantic_metrics(stats, ["a", "b"])
    assert m["per_class"]["a"]["iou"] == pytest.approx(100 / 110)
    assert m["per_class"]["a"]["dice"] == pytest.approx(200 / 210)
    assert m["per_class"]["b"] == {"iou": 0.0, "dice": 0.0}
    assert m["per_class"][BACKGROUND]["iou"] == 1.0
    assert m["mIoU"] == pytest.approx((100 / 110 + 0) / 2)  # background is not in the mean
    assert stats.confusion.tolist() == [[290, 0, 0], [0, 100, 10], [0, 0, 0]]  # rows: truth, columns: prediction

    unseen = semantic_metrics(PixelStats(num_classes=1), ["c"])
    assert unseen["per_class"]["c"] == {"iou": None, "dice": None} and unseen["mIoU"] is None


def test_split_selection(tmp_path):
    def rec(name: str, split: str | None = None) -> ImageRecord:
        return ImageRecord(tmp_path / "images" / name, 4, 4, [Instance("leaf", None, (0, 0, 1, 1))], name, split)

    images = [rec("a.jpg", "train"), rec("b.jpg", "val"), rec("c.jpg", "val")]
    saved = {"train": [str(tmp_path / "images" / "b.jpg")], "val": ["images/a.jpg"], "test": []}
    chosen, how = select_split(images, saved, "val", tmp_path)  # relative to the dataset
    assert [r.image_id for r in chosen] == ["a.jpg"] and "checkpoint" in how
    assert [r.image_id for r in select_split(images, saved, "train", tmp_path)[0]] == ["b.jpg"]  # absolute
    assert [r.image_id for r in select_split(images, None, "val", tmp_path)[0]] == ["b.jpg", "c.jpg"]
    assert len(select_split(images, saved, "all", tmp_path)[0]) == 3
    with pytest.raises(SplitError, match="has no test split"):
        select_split(images, None, "test", tmp_path)
    with pytest.raises(SplitError, match="none of the 1 val images"):
        select_split(images, {"val": ["elsewhere/z.jpg"]}, "val", tmp_path)
    no_splits = [rec("a.jpg"), rec("b.jpg")]
    assert len(select_split(no_splits, None, "val", tmp_path)[0]) == 2


@pytest.mark.parametrize("command", [["evaluate", "--checkpoint"], ["refiner"]])
def test_a_checkpoint_that_names_no_data_asks_for_data(command, untrained_checkpoint, tmp_path, capsys):
    """evaluate and refiner read their images the same way: the checkpoint's data, else --data."""
    assert main([*command, str(untrained_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert f"{untrained_checkpoint} does not say which data it was trained on; pass --data" in err
    assert main([*command, str(untrained_checkpoint), "--data", str(tmp_path / "gone")]) == 2
    assert str(tmp_path / "gone") in capsys.readouterr().err
