"""Shared fixtures. One tiny model is trained once per session and shared by every test that needs one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SHARED = REPO.parent / "shared"
OVERFIT_EPOCHS = 38  # x 2 steps: 76 SGD steps overfit 4 images at 128 px from random init (mask AP50 0.97)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def shared_realdata() -> Path:
    path = SHARED / "realdata"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (team-only real exports)")
    return path


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory) -> Path:
    """A random-init checkpoint in segkit's format: fast, for tests that only need a loadable model."""
    import torch

    from segkit.checkpoint import save_checkpoint
    from segkit.model import build_model

    torch.manual_seed(0)
    classes = ["leaf", "pebble", "shell"]
    model = build_model("maskrcnn_resnet50_fpn", len(classes) + 1, weights=None, img_size=128)
    path = tmp_path_factory.mktemp("untrained") / "untrained.pt"
    save_checkpoint({"model": model.state_dict(), "arch": "maskrcnn_resnet50_fpn", "classes": classes,
                     "img_size": 128, "score_threshold": 0.05, "frozen_bn": False}, path)
    return path


def write_subset(src_split: Path, dst: Path, n: int, splits=("train", "val")) -> Path:
    """Copy the first ``n`` sample images that have objects, as a Label Studio COCO export per split.

    The same images go to every split: that is what an overfit test wants.
    """
    coco = json.loads((src_split / "result.json").read_text())
    with_objects = sorted({a["image_id"] for a in coco["annotations"]})[:n]
    images = [im for im in coco["images"] if im["id"] in with_objects]
    subset = {**coco, "images": images,
              "annotations": [a for a in coco["annotations"] if a["image_id"] in with_objects]}
    for split in splits:
        (dst / split / "images").mkdir(parents=True)
        for im in images:
            shutil.copy(src_split / im["file_name"], dst / split / im["file_name"])
        (dst / split / "result.json").write_text(json.dumps(subset))
    return dst


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 sample images with objects, as train and val."""
    return write_subset(SAMPLE / "train", tmp_path_factory.mktemp("tiny") / "data", 4)


def tiny_config(data: Path, out: Path, **overrides):
    """Settings for CPU tests: random init, 128 px, no augmentation, no worker processes."""
    from segkit.train import TrainConfig

    settings = dict(data=str(data), weights="none", img_size=128, batch_size=2, workers=0, aug="none",
                    lr=0.01, warmup_iters=5, epochs=2, roi_batch_size=128, out=str(out), progress=False, seed=0)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="session")
def overfit_run(tiny_data, tmp_path_factory) -> dict:
    """Train from random init on the 4 tiny images until it has learned them (about 4 minutes on 2 cores)."""
    from segkit.train import train

    out = tmp_path_factory.mktemp("overfit") / "run"
    return train(tiny_config(tiny_data, out, epochs=OVERFIT_EPOCHS, eval_every=OVERFIT_EPOCHS, lr=0.02,
                             warmup_iters=10, schedule="step"))


@pytest.fixture(scope="session")
def trained_checkpoint(overfit_run) -> Path:
    """best.pt of a tiny model overfit on 4 sample images: its predictions match their ground truth."""
    return Path(overfit_run["best"])
