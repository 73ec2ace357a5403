"""Shared fixtures. One tiny model is trained once per session and shared by every test that needs one."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SHARED = REPO.parent / "shared"


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


@pytest.fixture(scope="session")
def trained_checkpoint(untrained_checkpoint) -> Path:
    """best.pt of a tiny model overfit on 4 sample images (replaced by a real training run by the trainer)."""
    return untrained_checkpoint
