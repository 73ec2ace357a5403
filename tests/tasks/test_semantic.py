"""--task semantic: targets from instance annotations, models, training to a good mIoU, and the same
checkpoint through Predictor, ``segkit evaluate``, ``segkit predict`` and the demo."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segkit.data.class_map import IGNORE_INDEX, class_map
from segkit.cli import main
from segkit.models.mask_rcnn import WeightsError
from segkit.structures.prediction import SemanticPrediction
from segkit.inference.predictor import Predictor
from segkit.data.readers import load_dataset
from segkit.data.records import ImageRecord, Instance
from segkit.data.dataset import SemanticDataset
from segkit.evaluation.semantic_metrics import SemanticEvaluator
from segkit.models.semantic import build_semantic_model
from segkit.engine.trainer import TrainingStopped, train
from tests.helpers import REPO, free_port, tiny_config

CLASSES = ["leaf", "pebble", "shell"]


def _square(label: str, x0: int, y0: int, x1: int, y1: int, iscrowd: bool = False) -> Instance:
    return Instance(label, [[x0, y0, x1, y0, x1, y1, x0, y1]], (x0, y0, x1, y1), iscrowd=iscrowd)


def _record(instances: list[Instance], path: Path = Path("synthetic.png")) -> ImageRecord:
    return ImageRecord(path, width=20, height=12, instances=instances)


# --- targets -----------------------------------------------------------------------------------

def test_later_instance_wins_overlaps_and_crowd_regions_are_ignored():
    leaf, shell = _square("leaf", 0, 0, 10, 10), _square("shell", 6, 2, 16, 8)
    crowd = _square("pebble", 14, 0, 20, 4, iscrowd=True)
    boxless = Instance("pebble", None, (0, 0, 20, 12))  # a rectangle: no mask, adds nothing

    cmap = class_map(_record([leaf, shell, crowd, boxless]), CLASSES)
    assert cmap.dtype == np.uint8 and cmap.shape == (12, 20)
    assert cmap[1, 1] == 1  # leaf alone
    assert cmap[5, 8] == 3  # leaf and shell overlap: shell was drawn later
    assert cmap[6, 12] == 3  # shell alone
    assert cmap[2, 17] == IGNORE_INDEX  # crowd, over the shell and on its own
    assert cmap[2, 15] == IGNORE_INDEX
    assert cmap[11, 19] == 0  # background
    # The other order: leaf drawn last wins the same pixel.
    assert class_map(_record([shell, leaf]), CLASSES)[5, 8] == 1
    with pytest.raises(KeyError, match="'cat'"):
        class_map(_record([_square("cat", 0, 0, 2, 2)]), CLASSES)


def test_labelme_ignore_and_coco_crowd_regions_read_from_exports_become_255(tmp_path):
    from tests.exports import coco_ann, coco_export, labelme_file, labelme_shape, square, write_image

    write_image(tmp_path / "labelme" / "a.png", size=(40, 30))
    shapes = [labelme_shape("leaf", [[0, 0], [20, 0], [20, 20], [0, 20]]),
              labelme_shape("__ignore__", [[10, 10], [30, 10], [30, 25], [10, 25]])]
    labelme_file(tmp_path / "labelme" / "a.json", shapes, "a.png", (40, 30))
    [record] = load_dataset(tmp_path / "labelme").images
    cmap = class_map(record, ["leaf"])
    assert (cmap[2, 2], cmap[15, 15], cmap[20, 25], cmap[28, 38]) == (1, IGNORE_INDEX, IGNORE_INDEX, 0)
    assert [i.label for i in record.instances] == ["leaf"]  # still no instance from __ignore__

    write_image(tmp_path / "coco" / "b.png", size=(40, 30))
    coco_export(tmp_path / "coco", [{"id": 1, "file_name": "b.png", "width": 40, "height": 30}],
                [coco_ann(1, 1, 1, [square(0, 0, 20, 20)]), coco_ann(2, 1, 1, [square(10, 10, 30, 25)], iscrowd=1)],
                [{"id": 1, "name": "leaf"}])
    [record] = load_dataset(tmp_path / "coco" / "result.json").images
    assert np.array_equal(class_map(record, ["leaf"]), cmap)


def test_dataset_target_is_the_class_map_at_the_image_size(tmp_path):
    path = tmp_path / "im.png"
    Image.new("RGB", (20, 12), (10, 20, 30)).save(path)
    record = _record([_square("leaf", 0, 0, 10, 10), _square("shell", 6, 2, 16, 8),
                      _square("pebble", 14, 0, 20, 4, iscrowd=True)], path)
    image, target = SemanticDataset([record], CLASSES)[0]
    assert image.shape == (3, 12, 20) and target["image_id"] == 0
    assert target["semantic"].dtype == torch.int64
    assert np.array_equal(target["semantic"].numpy(), class_map(record, CLASSES))


def test_evaluator_counts_pixels_and_skips_ignored_ones():
    truth = np.array([[0, 1, 1, IGNORE_INDEX], [2, 2, 0, 0]], np.uint8)
    predicted = np.array([[0, 1, 2, 1], [2, 2, 0, 1]], np.uint8)
    evaluator = SemanticEvaluator(["a", "b"])
    evaluator.process([{"semantic": truth}], [SemanticPrediction(predicted, ["a", "b"])])
    report = evaluator.summarize()
    assert report["pixel_accuracy"] == pytest.approx(5 / 7)  # the ignored pixel is not judged
    assert report["per_class"]["a"]["iou"] == pytest.approx(1 / 3)  # 1 shared of {gt 2} | {pred 2}
    assert report["per_class"]["b"]["iou"] == pytest.approx(2 / 3)
    assert report["per_class"]["b"]["dice"] == pytest.approx(4 / 5)
    assert report["mIoU"] == pytest.approx(0.5)  # background left out of the mean, as for instance models


# --- models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["deeplabv3_resnet50", "lraspp_mobilenet_v3_large", "unet_resnet18"])
def test_models_build_for_the_users_classes_and_keep_the_image_size(arch):
    torch.manual_seed(0)
    model = build_semantic_model(arch, 4, weights=None, img_size=64).eval()
    with torch.no_grad():
        logits = model([torch.rand(3, 50, 70), torch.rand(3, 37, 41)])
    assert [tuple(x.shape) for x in logits] == [(4, 50, 70), (4, 37, 41)]
    model.train()
    targets = [{"semantic": torch.randint(0, 4, (50, 70))}, {"semantic": torch.full((37, 41), IGNORE_INDEX)}]
    losses = model([torch.rand(3, 50, 70), torch.rand(3, 37, 41)], targets)
    assert set(losses) == {"loss_ce", "loss_dice"} and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("arch, file_name", [("deeplabv3_resnet50", "deeplabv3_resnet50_coco-cd0a2569.pth"),
                                             ("lraspp_mobilenet_v3_large", "lraspp_mobilenet_v3_large-d234d4ea.pth")])
def test_offline_pretrained_torchvision_weights_say_where_to_put_the_file(arch, file_name, monkeypatch):
    from torchvision.models import _api as torchvision_api

    def offline(url, *args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", offline)  # what no network does, at once
    with pytest.raises(WeightsError) as err:
        build_semantic_model(arch, 4, weights="coco")
    assert file_name in str(err.value) and "--weights none" in str(err.value)


def test_offline_unet_encoder_weights_say_where_to_put_them(monkeypatch):
    import segmentation_models_pytorch.encoders as smp_encoders
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the Hub and the file is not in the cache")

    monkeypatch.setattr(smp_encoders, "hf_hub_download", offline)  # the Hub's own retries take ~25 s
    with pytest.raises(WeightsError) as err:
        build_semantic_model("unet_resnet34", 4, weights="coco")
    assert "smp-hub/resnet34.imagenet" in str(err.value) and "--weights none" in str(err.value)


def test_a_model_of_the_other_task_is_refused_with_the_choices(tiny_data, tmp_path, capsys):
    assert main(["train", "--data", str(tiny_data), "--task", "semantic", "--model", "maskrcnn_resnet50_fpn",
                 "--weights", "none", "--out", str(tmp_path / "a")]) == 2
    assert "unet_resnet34" in capsys.readouterr().err
    with pytest.raises(TrainingStopped, match="maskrcnn_resnet50_fpn"):
        train(tiny_config(tiny_data, tmp_path / "b", task="instance", model="unet_resnet34"))


def test_semantic_run_resumes_with_its_task_and_history(tiny_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, task="semantic", model="unet_resnet18", epochs=1, limit=2))
    # Resumed without --task or --model: both come from the checkpoint.
    train(tiny_config(tiny_data, tmp_path / "ignored", epochs=2, resume=str(out / "last.pt")))
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["val_miou"] for r in rows)
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["task"], last["arch"], last["epoch"]) == ("semantic", "unet_resnet18", 2)


def test_weights_from_a_checkpoint_of_other_classes_keep_the_body(semantic_checkpoint):
    ckpt = torch.load(semantic_checkpoint, weights_only=True)
    model = build_semantic_model(ckpt["arch"], 2, weights=semantic_checkpoint, img_size=64)
    own = model.state_dict()
    body = [k for k in ckpt["model"] if not k.startswith("net.segmentation_head.")]
    assert body and all(torch.equal(own[k], ckpt["model"][k]) for k in body)
    assert own["net.segmentation_head.0.weight"].shape[0] == 2


def test_weights_from_a_checkpoint_keep_each_class_row_by_name(semantic_checkpoint):
    ckpt = torch.load(semantic_checkpoint, weights_only=True)
    assert ckpt["classes"] == ["leaf", "pebble", "shell"]
    model = build_semantic_model(ckpt["arch"], 3, weights=semantic_checkpoint, img_size=64, classes=["shell", "leaf"])
    for key in ("net.segmentation_head.0.weight", "net.segmentation_head.0.bias"):
        trained, own = ckpt["model"][key], model.state_dict()[key]
        assert torch.equal(own, trained[[0, 3, 1]]), key  # background, shell, leaf


# --- training, and the checkpoint everywhere ----------------------------------------------------

def test_overfit_reaches_miou_and_writes_semantic_metrics(semantic_overfit_run):
    out = Path(semantic_overfit_run["out"])
    best = semantic_overfit_run["best_metrics"]
    assert best["val_miou"] >= 0.8, best
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    wanted = {"train_loss_ce", "train_loss_dice", "val_loss", "val_miou", "val_mdice", "val_pixel_accuracy",
              *(f"val_{m}_{c}" for m in ("iou", "dice") for c in [*CLASSES, "background"])}
    assert wanted <= set(rows[0]) and "val_segm_map" not in rows[0]
    assert float(rows[-1]["val_miou"]) >= 0.8
    for name in ("loss_curves.png", "metrics.png", "val_predictions.png", "best.pt", "last.pt"):
        assert (out / name).stat().st_size > 0, name
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["task"] == "semantic" and ckpt["arch"] == semantic_overfit_run["arch"] and "mask_head" not in ckpt


def test_reloaded_checkpoint_predicts_identically_and_matches_the_training_metrics(semantic_checkpoint, tiny_data):
    first, second = Predictor.from_checkpoint(semantic_checkpoint), Predictor.from_checkpoint(semantic_checkpoint)
    assert first.task == "semantic"
    records = load_dataset(tiny_data / "val").images
    a, b = first.predict_batch([r.path for r in records]), second.predict_batch([r.path for r in records])
    for record, pa, pb in zip(records, a, b):
        assert isinstance(pa, SemanticPrediction) and pa.image_size == (record.width, record.height)
        assert np.array_equal(pa.class_map, pb.class_map)
    # The same images through the predictor score what training measured on them (its val split).
    evaluator = SemanticEvaluator(first.classes, records)
    evaluator.process([{"image_id": i} for i in range(len(records))], a)
    saved = torch.load(semantic_checkpoint, weights_only=True)["metrics"]
    assert evaluator.summarize()["mIoU"] == pytest.approx(saved["val_miou"], abs=1e-9)


def test_evaluate_json_has_the_per_class_keys(semantic_checkpoint, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", str(semantic_checkpoint), "--json", str(out), "--out", str(tmp_path)]) == 0
    report = json.loads(out.read_text())["semantic"]
    saved = torch.load(semantic_checkpoint, weights_only=True)["metrics"]
    assert report["mIoU"] == pytest.approx(saved["val_miou"]) and report["mIoU"] >= 0.8
    assert report["pixel_accuracy"] == pytest.approx(saved["val_pixel_accuracy"])
    for name in CLASSES:
        assert report["per_class"][name]["iou"] == pytest.approx(saved[f"val_iou_{name}"])
        assert report["per_class"][name]["dice"] == pytest.approx(saved[f"val_dice_{name}"])
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0
    assert "pixel accuracy" in capsys.readouterr().out


def test_predict_writes_class_pngs_and_one_brush_per_class(semantic_checkpoint, tiny_data, tmp_path):
    images, out = tiny_data / "val" / "images", tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(semantic_checkpoint), "--out", str(out), str(images)]) == 0
    predictor = Predictor.from_checkpoint(semantic_checkpoint)
    tasks = json.loads((out / "labelstudio.json").read_text())
    assert len(tasks) == 4
    for task in tasks:
        name = Path(task["data"]["image"]).name
        expected = predictor(images / name).class_map
        png = np.asarray(Image.open(out / "masks" / f"{Path(name).stem}.png"))
        assert np.array_equal(png, expected), name  # pixel value = class index
        assert (out / "overlays" / f"{Path(name).stem}.png").is_file()
        result = task["predictions"][0]["result"]
        labels = [r["value"]["brushlabels"][0] for r in result]
        present = [CLASSES[k - 1] for k in np.unique(expected) if k]
        assert {r["type"] for r in result} == {"brushlabels"} and sorted(labels) == sorted(present)
    # Accepted as they are, the brushes read back as the same class maps.
    for task in tasks:
        task["annotations"] = [{"id": 1, "result": task["predictions"][0]["result"]}]
    accepted = tmp_path / "accepted.json"
    accepted.write_text(json.dumps([{**t, "id": i} for i, t in enumerate(tasks, start=1)]))
    for record in load_dataset(accepted, fmt="labelstudio-json", images_dir=images).images:
        png = np.asarray(Image.open(out / "masks" / f"{Path(record.path).stem}.png"))
        assert np.array_equal(class_map(record, CLASSES), png), record.path


def test_export_refuses_a_semantic_checkpoint(semantic_checkpoint, tmp_path):
    from segkit.inference.export import ExportError, export

    with pytest.raises(ExportError, match="semantic"):
        export(semantic_checkpoint, "onnx", tmp_path / "m.onnx")



def test_demo_segment_endpoint_serves_a_semantic_checkpoint(semantic_checkpoint, tiny_data, gradio_client_downloads):
    from gradio_client import Client, handle_file

    spec = importlib.util.spec_from_file_location("segkit_demo_semantic", REPO / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    predictor, note = demo.load_predictor(str(semantic_checkpoint))
    assert predictor.task == "semantic" and note == ""
    image_path = sorted((tiny_data / "val" / "images").iterdir())[0]
    app = demo.build_demo(predictor, [])
    _, url, _ = app.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    try:
        overlay_path, table, files = Client(url, verbose=False).predict(handle_file(str(image_path)), 0.5,
                                                                        api_name="/segment")
    finally:
        app.close()
    expected = predictor(image_path).class_map
    source = Image.open(image_path).convert("RGB")
    drawn = Image.open(overlay_path)
    assert drawn.size == source.size
    changed = (np.asarray(drawn.convert("RGB"), np.int16) != np.asarray(source, np.int16)).any(axis=2)
    assert changed[expected > 0].mean() > 0.9 and changed[expected == 0].mean() < 0.1
    assert table["headers"] == demo.CLASS_TABLE_COLUMNS
    rows = {row[0]: row for row in table["data"]}
    counts = np.bincount(expected.ravel(), minlength=len(CLASSES) + 1)
    assert set(rows) == {CLASSES[k - 1] for k in np.flatnonzero(counts[1:]) + 1} and rows
    for name, row in rows.items():
        area = int(counts[CLASSES.index(name) + 1])
        assert row[1] == area and row[2] == pytest.approx(100 * area / expected.size, abs=0.01)
    assert np.array_equal(np.asarray(Image.open(files[1])), expected)  # the class-index download
    coco = json.loads(Path(files[2]).read_text())
    assert sorted(a["category_name"] for a in coco["annotations"]) == sorted(rows)


def test_ml_backend_answers_with_one_region_per_class(semantic_checkpoint, tiny_data, tmp_path):
    import functools
    import http.server
    import threading

    from fastapi.testclient import TestClient

    from segkit.serve.backend import BackendConfig, create_app

    images = tiny_data / "val" / "images"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # the task's image URL
    threading.Thread(target=server.serve_forever, daemon=True).start()
    name = sorted(images.iterdir())[0].name
    labels = '<Label value="Leaf"/><Label value="Pebble"/><Label value="Shell"/>'
    polygons = f'<PolygonLabels name="outline" toName="photo">{labels}</PolygonLabels>'
    brushes = f'<BrushLabels name="paint" toName="photo">{labels}</BrushLabels>'
    cfg = BackendConfig(checkpoint=semantic_checkpoint, runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache",
                        label_studio_url=None, api_key=None, allow_hosts=["127.0.0.1"],  # the test's image server
                        tile=512)  # tiles are for instance models: a warning, whole images, no crash at start
    task = {"id": 1, "data": {"img": f"http://127.0.0.1:{server.server_address[1]}/{name}"}}
    try:
        with TestClient(create_app(cfg), base_url="http://127.0.0.1") as client:
            both, only_polygons = [client.post("/predict", json={"tasks": [task], "label_config":
                                                                 f'<View><Image name="photo" value="$img"/>{c}</View>'})
                                   for c in (polygons + brushes, polygons)]
    finally:
        server.shutdown()
    expected = Predictor.from_checkpoint(semantic_checkpoint)(images / name).class_map
    present = sorted(CLASSES[k - 1].capitalize() for k in np.unique(expected) if k)
    [result] = both.json()["results"]
    # Brushes when the config has them, even after a polygon tag: a class's area, pieces and all.
    assert {(r["type"], r["from_name"]) for r in result["result"]} == {("brushlabels", "paint")}
    assert sorted(r["value"]["brushlabels"][0] for r in result["result"]) == present
    [result] = only_polygons.json()["results"]  # else polygons, one or more per class
    assert {(r["type"], r["from_name"]) for r in result["result"]} == {("polygonlabels", "outline")}
    assert sorted({r["value"]["polygonlabels"][0] for r in result["result"]}) == present
