"""The mobile architectures end to end: trained (MobileNetV2 from the shared ImageNet backbone where ../shared is
here, MobileNetV3 from random init), resumed, reloaded, evaluated, exported and served like the ResNet ones."""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segkit.cli import main
from segkit.engine.trainer import train
from segkit.inference.predictor import Predictor
from segkit.models.checkpoint import load_checkpoint, save_checkpoint
from segkit.serve.demo import model_examples, model_panel
from tests.helpers import REPO, SHARED, TINY_IMAGES, assert_same_detections, tiny_config

SHARED_MOBILENET_V2 = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"
EPOCHS = 4  # x 2 steps: enough for detections to exist, not to learn the images (the bench measures learning)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, dict]:
    """One tiny training of each mobile architecture (160 px, 4 images); name -> train()'s summary."""
    weights = str(SHARED_MOBILENET_V2) if SHARED_MOBILENET_V2.is_file() else "none"
    out = tmp_path_factory.mktemp("mobile")
    made = {}
    for arch, start in (("maskrcnn_mobilenet_v2_fpn", weights), ("maskrcnn_mobilenet_v3_large_fpn", "none")):
        cfg = tiny_config(tiny_data, out / arch, model=arch, weights=start, img_size=160, epochs=EPOCHS, lr=0.02,
                          eval_every=EPOCHS, save_interval=0)
        made[arch] = {**train(cfg), "cfg": cfg}
    return made


def test_the_run_says_where_each_part_started_from(runs):
    run = runs["maskrcnn_mobilenet_v2_fpn"]
    out = Path(run["out"])
    config = json.loads((out / "config.json").read_text())
    card = (out / "MODEL_CARD.md").read_text()
    best = load_checkpoint(run["best"])
    if SHARED_MOBILENET_V2.is_file():
        assert config["start"]["backbone"] == f"backbone file {SHARED_MOBILENET_V2}"
        assert f"| backbone | backbone file {SHARED_MOBILENET_V2} |" in card
    assert config["start"]["mask head"] == "random init" and best["start"] == config["start"]
    assert "### Starting weights" in card
    random_run = runs["maskrcnn_mobilenet_v3_large_fpn"]
    assert set(load_checkpoint(random_run["best"])["start"].values()) == {"random init"}


@pytest.mark.parametrize("arch", ["maskrcnn_mobilenet_v2_fpn", "maskrcnn_mobilenet_v3_large_fpn"])
def test_reloaded_checkpoint_evaluates_to_what_training_recorded(runs, arch, tmp_path):
    run = runs[arch]
    report = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", run["best"], "--split", "val", "--json", str(report)]) == 0
    measured = json.loads(report.read_text())
    recorded = load_checkpoint(run["best"])["metrics"]
    assert measured["segm"]["AP"] == pytest.approx(recorded["val_segm_map"], abs=1e-6)
    assert measured["bbox"]["AP"] == pytest.approx(recorded["val_bbox_map"], abs=1e-6)


def test_resume_continues_the_mobile_run(runs):
    run = runs["maskrcnn_mobilenet_v3_large_fpn"]
    cfg = dataclasses.replace(run["cfg"], epochs=EPOCHS + 1, resume=run["last"])
    before = load_checkpoint(run["last"])
    summary = train(cfg)
    after = load_checkpoint(summary["last"])
    assert after["epoch"] == EPOCHS + 1 and len(after["history"]) == EPOCHS + 1
    assert after["history"][:EPOCHS] == before["history"]
    assert after["arch"] == "maskrcnn_mobilenet_v3_large_fpn"
    changed = [k for k, v in after["model"].items() if v.is_floating_point() and not torch.equal(v, before["model"][k])]
    assert changed  # one more epoch of training moved the weights


def _image(tiny_data) -> Image.Image:
    return Image.open(tiny_data / "val" / TINY_IMAGES[0]).convert("RGB")


@pytest.mark.parametrize("fmt,packages,suffix", [("onnx", ("onnx", "onnxruntime"), ".onnx"),
                                                 ("openvino", ("onnx", "openvino"), ".xml"),
                                                 ("torchscript", (), ".torchscript")])
def test_export_of_a_mobile_model_gives_the_eager_detections(runs, tiny_data, tmp_path, fmt, packages, suffix):
    for package in packages:
        importlib.import_module(package)
    checkpoint = runs["maskrcnn_mobilenet_v3_large_fpn"]["best"]
    out = tmp_path / f"model{suffix}"
    assert main(["export", "--checkpoint", checkpoint, "--format", fmt, "--out", str(out),
                 "--max-detections", "10"]) == 0
    image = _image(tiny_data)
    want = Predictor.from_checkpoint(checkpoint, device="cpu", max_detections=10)(image, score_threshold=0.05)
    got = Predictor.from_checkpoint(out)(image, score_threshold=0.05)
    assert_same_detections(want, got)


def test_the_demo_serves_a_mobile_checkpoint(runs, tiny_data):
    spec = importlib.util.spec_from_file_location("segkit_demo_mobile", REPO / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    checkpoint = runs["maskrcnn_mobilenet_v2_fpn"]["best"]
    predictor, note = demo.load_predictor(checkpoint)
    assert predictor is not None and "maskrcnn_mobilenet_v2_fpn" in model_panel(predictor)
    image = _image(tiny_data)
    drawn, *_ = demo.predict(image, 0.05, predictor)
    assert drawn.size == image.size
    assert np.any(np.asarray(drawn) != np.asarray(image))  # something was drawn on it
    # the app offers the model's own val images, not the embedded sample's
    examples = model_examples(predictor)
    assert examples and all(Path(p).resolve().is_relative_to(tiny_data.resolve()) for p in examples)


def test_a_model_of_other_classes_whose_images_are_gone_offers_no_sample_examples(runs, tmp_path):
    ckpt = load_checkpoint(runs["maskrcnn_mobilenet_v3_large_fpn"]["best"])
    other = {**ckpt, "classes": ["apple", "pear", "plum"], "config": {**ckpt["config"], "data": str(tmp_path / "gone")}}
    save_checkpoint(other, tmp_path / "fruits.pt")
    predictor = Predictor.from_checkpoint(tmp_path / "fruits.pt")
    assert model_examples(predictor) == []
    assert model_examples(predictor, REPO / "data" / "sample" / "val" / "images")  # a folder given is used


def test_the_prompt_engine_answers_a_box_and_a_click_with_a_mobile_model(runs, tiny_data):
    from segkit.serve.prompts import PromptEngine

    predictor = Predictor.from_checkpoint(runs["maskrcnn_mobilenet_v2_fpn"]["best"], device="cpu")
    image = _image(tiny_data)
    engine = PromptEngine(predictor)
    box = (40.0, 30.0, 150.0, 120.0)
    mask, cls, _ = engine.box("img", image, box, label=1)
    ys, xs = np.nonzero(mask)
    assert mask.shape == (image.height, image.width) and cls == 1
    assert len(xs) == 0 or (xs.min() >= 39 and xs.max() <= 151 and ys.min() >= 29 and ys.max() <= 121)
    answers = engine.clicks("img", image, [(90.0, 70.0)], [])
    assert all(a.mask.shape == (image.height, image.width) for a in answers)


def test_a_space_of_a_mobile_model_in_openvino_shows_its_own_val_images_and_serves_them(runs, tiny_data, tmp_path,
                                                                                        capsys):
    """The recommended Space (mobile + OpenVINO), served by its app.py; the install itself is test_space.py's."""
    import sys

    from gradio_client import Client, handle_file

    from tests.serve.test_space import assert_segmented, build, serve

    importlib.import_module("openvino")
    space = tmp_path / "space"
    build([runs["maskrcnn_mobilenet_v2_fpn"]["best"], "--out", str(space), "--format", "openvino"], capsys)
    examples = sorted((space / "examples").iterdir())
    val = {p.name for p in (tiny_data / "val" / "images").iterdir()}
    assert {p.name.split("_", 1)[1] for p in examples} <= val and len(examples) == min(4, len(val))  # "1_<name>"
    example = examples[0]
    with serve(Path(sys.executable), space, tmp_path / "app.log") as url:
        # 0.05: a model of 8 steps is unsure of everything (the demo test's threshold)
        overlay, table, _ = Client(url, verbose=False).predict(handle_file(str(example)), 0.05, api_name="/segment")
    assert_segmented(Image.open(overlay).convert("RGB"), table["data"], example)
    assert "model/model.xml" in (tmp_path / "app.log").read_text()
