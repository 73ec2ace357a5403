"""Helpers the tests import (``from tests.helpers import ...``): paths and small datasets."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SHARED = REPO.parent / "shared"
# The overfit fixtures' 4 images: every class at least 5 times (leaf 7, pebble 5, shell 6, 18 instances).
# The first 4 sample images hold a single pebble, which one training run learned and another, on another
# CPU, did not: a class seen once is a coin toss, and tests then measured the toss.
TINY_IMAGES = ("images/dabec4bb-img_0001.jpg", "images/7ad706f8-img_0005.jpg", "images/1ac81059-img_0009.jpg",
               "images/2c28102d-img_0011.jpg")


def missing(reason: str) -> NoReturn:
    """A part of the test setup is missing: under ``make test`` (and so CI), which sets
    ``SEGKIT_TEST_STRICT=1`` after installing everything, that is a failure a skip would hide; plain
    ``pytest`` on a bare machine skips, saying why."""
    if os.environ.get("SEGKIT_TEST_STRICT") == "1":
        pytest.fail(f"{reason} (make test installs it; SEGKIT_TEST_STRICT=1 makes this a failure)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, install: str = "pip install -r requirements-test.txt") -> ModuleType:
    """``import name``, or :func:`missing` saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"{name} is not installed ({install}): {e}")


def fixture_seed() -> int:
    """The seed of the tests' trainings: ``SEGKIT_TEST_SEED`` (default 0), to show they pass on any seed."""
    return int(os.environ.get("SEGKIT_TEST_SEED", "0"))


def write_subset(src_split: Path, dst: Path, n: int, splits=("train", "val"), names=None) -> Path:
    """Copy the first ``n`` sample images that have objects (or the images ``names``), as a Label Studio
    COCO export per split.

    The same images go to every split: that is what an overfit test wants.
    """
    coco = json.loads((src_split / "result.json").read_text())
    with_objects = sorted({a["image_id"] for a in coco["annotations"]})[:n]
    if names is not None:
        with_objects = [im["id"] for im in coco["images"] if im["file_name"] in names]
    images = [im for im in coco["images"] if im["id"] in with_objects]
    subset = {**coco, "images": images,
              "annotations": [a for a in coco["annotations"] if a["image_id"] in with_objects]}
    for split in splits:
        (dst / split / "images").mkdir(parents=True)
        for im in images:
            shutil.copy(src_split / im["file_name"], dst / split / im["file_name"])
        (dst / split / "result.json").write_text(json.dumps(subset))
    return dst


# x 2 steps of SGD: enough for the standard head to learn the 4 images on this project's machine (seed 0, one
# thread: mask AP50 0.952, the weakest class 0.364 at 40 epochs; 0.988 and 0.506 at 50); on a machine where
# it is not, the fixture trains MORE_EPOCHS more at a time, so it costs about what 50 epochs always did
OVERFIT_EPOCHS = 40
MORE_EPOCHS = 10


def overfit_config(data: Path, out: Path, epochs: int = OVERFIT_EPOCHS, **overrides):
    """The overfit fixture's settings (also ``bench/pointrend_quality.py``'s), evaluated once per chunk: at
    ``epochs``, and at the end of each extension (training always evaluates after its last epoch). It samples
    128 proposals per image, not ``tiny_config``'s 64: with 64, 50 epochs reached mask AP50 0.863 (2026-12-03)."""
    return tiny_config(data, out, epochs=epochs, eval_every=epochs, lr=0.02, warmup_iters=10,
                       schedule="step", roi_batch_size=128, **overrides)


# segkit export of the untrained checkpoint (conftest's ``exported``): each format's file name, and the
# detection slots it keeps (a random model fills every slot; 10 keep the mask head and the export cheap)
EXPORT_SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".torchscript"}
EXPORT_MAX_DETECTIONS = 10


def tiny_config(data: Path, out: Path, **overrides):
    """Settings for CPU tests: random init, 128 px, no augmentation, no worker processes, 64 sampled proposals
    per image (on a CPU the mask head on the positive ones is most of a step: 1.7 s against 2.9 s at 128)."""
    from segkit.engine.trainer import TrainConfig

    settings = dict(data=str(data), weights="none", img_size=128, batch_size=2, workers=0, aug="none",
                    lr=0.01, warmup_iters=5, epochs=2, roi_batch_size=64, out=str(out), progress=False,
                    seed=fixture_seed())
    return TrainConfig(**{**settings, **overrides})


def tiny_train_args(data: Path, out: Path, epochs: int = 2, *extra: str) -> list[str]:
    """``segkit train`` on 2 images at 64 px from random init: one step an epoch."""
    return ["train", "--data", str(data), "--out", str(out), "--weights", "none", "--img-size", "64",
            "--epochs", str(epochs), "--batch-size", "2", "--limit", "2", "--workers", "0", "--aug", "none",
            "--roi-batch-size", "64", "--warmup-iters", "2", "--no-progress", *extra]


def chrome(profile: Path):
    """Debian's headless Chromium through selenium, its profile in ``profile`` (a test's tmp_path, so
    pytest cleans it up); skips the test when either is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed (pip install -r requirements-test.txt)")
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(binary).exists() and Path(driver).exists()):
        missing("chromium and chromedriver are not installed (make browser, or apt-get install chromium "
                    "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1400", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def instance_scores(predictor, split: Path) -> list[tuple[float, float]]:
    """(mask IoU, Boundary IoU) of each ground-truth instance in ``split`` with its best-overlapping
    prediction of the same class (0, 0 when there is none), at the predictor's score threshold."""
    from segkit.evaluation.boundary import boundary_iou
    from segkit.data.readers import load_dataset

    scores = []
    for record in load_dataset(split).images:
        prediction = predictor(record.path)
        for inst in record.instances:
            gt = inst.mask(record.height, record.width).astype(bool)
            same_class = [m for m, name in zip(prediction.masks, prediction.class_names) if name == inst.label]
            ious = [(m & gt).sum() / (m | gt).sum() for m in same_class]
            if not ious:
                scores.append((0.0, 0.0))
                continue
            best = same_class[max(range(len(ious)), key=ious.__getitem__)]
            scores.append((float(max(ious)), float(boundary_iou(gt, best))))
    return scores


def assert_same_detections(want, got) -> None:
    """An exported model's :class:`Prediction` ``got`` against eager's ``want``: the same detections (at least
    one), boxes within a pixel, scores within 1e-3, each mask with IoU >= 0.98."""
    import numpy as np

    assert len(want) == len(got) > 0
    np.testing.assert_array_equal(want.labels, got.labels)
    np.testing.assert_allclose(want.boxes, got.boxes, atol=1.0)
    np.testing.assert_allclose(want.scores, got.scores, atol=1e-3)
    for a, b in zip(want.masks, got.masks):
        union = np.count_nonzero(a | b)
        assert union == 0 or np.count_nonzero(a & b) / union >= 0.98


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REFINER_STEPS = 120  # training steps of the overfit model's refinement head (conftest's refined_checkpoint)
