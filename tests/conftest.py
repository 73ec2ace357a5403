"""Shared fixtures. One tiny model is trained once per session and shared by every test that needs one."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import OVERFIT_EPOCHS, SAMPLE, SHARED, tiny_config, write_subset


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

    from segkit.checkpoint import make_checkpoint, save_checkpoint
    from segkit.model import build_model

    torch.manual_seed(0)
    classes = ["leaf", "pebble", "shell"]
    model = build_model("maskrcnn_resnet50_fpn", len(classes) + 1, weights=None, img_size=128)
    path = tmp_path_factory.mktemp("untrained") / "untrained.pt"
    save_checkpoint(make_checkpoint(model, "maskrcnn_resnet50_fpn", classes, img_size=128, score_threshold=0.05), path)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 sample images with objects, as train and val."""
    return write_subset(SAMPLE / "train", tmp_path_factory.mktemp("tiny") / "data", 4)


def _overfit(tiny_data: Path, out: Path, mask_head: str) -> dict:
    from segkit.trainer import train

    return train(tiny_config(tiny_data, out, epochs=OVERFIT_EPOCHS, eval_every=OVERFIT_EPOCHS, lr=0.02,
                             warmup_iters=10, schedule="step", mask_head=mask_head))


@pytest.fixture(scope="session")
def overfit_run(tiny_data, tmp_path_factory) -> dict:
    """Train from random init on the 4 tiny images until it has learned them (about 5 minutes on 2 cores)."""
    return _overfit(tiny_data, tmp_path_factory.mktemp("overfit") / "run", "standard")


@pytest.fixture(scope="session")
def pointrend_overfit_run(tiny_data, tmp_path_factory) -> dict:
    """The same training as ``overfit_run`` (images, size, epochs, seed), with the PointRend mask head."""
    return _overfit(tiny_data, tmp_path_factory.mktemp("overfit_pointrend") / "run", "pointrend")


@pytest.fixture(scope="session")
def trained_checkpoint(overfit_run) -> Path:
    """best.pt of a tiny model overfit on 4 sample images: its predictions match their ground truth."""
    return Path(overfit_run["best"])


SEMANTIC_EPOCHS = 40  # x 2 steps of AdamW: U-Net R18 from random init learns the 4 images (mIoU >= 0.8)


@pytest.fixture(scope="session")
def semantic_overfit_run(tiny_data, tmp_path_factory) -> dict:
    """``--task semantic``: a U-Net (ResNet-18) from random init, overfit on the 4 tiny images at 128 px."""
    from segkit.trainer import train

    cfg = tiny_config(tiny_data, tmp_path_factory.mktemp("semantic") / "run", task="semantic", model="unet_resnet18",
                      optimizer="adamw", lr=1e-3, weight_decay=1e-4, epochs=SEMANTIC_EPOCHS,
                      eval_every=SEMANTIC_EPOCHS // 2, warmup_iters=5)
    return {**train(cfg), "arch": cfg.model}


@pytest.fixture(scope="session")
def semantic_checkpoint(semantic_overfit_run) -> Path:
    """best.pt of the semantic overfit run."""
    return Path(semantic_overfit_run["best"])
