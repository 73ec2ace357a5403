"""utils/mask_ceiling.py: how much detail a mask grid and the model's input size can hold."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from tests.helpers import REPO


@pytest.fixture(scope="module")
def ceiling():
    spec = importlib.util.spec_from_file_location("mask_ceiling", REPO / "utils" / "mask_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cog(size: int = 600, teeth: int = 40) -> np.ndarray:
    """A cog filling most of the image, its teeth finer than a 28th of its width."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xs - size / 2, ys - size / 2
    return np.hypot(dx, dy) < size * (0.4 + 0.03 * np.sign(np.sin(teeth * np.arctan2(dy, dx))))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_a_28_grid_rounds_off_detail_that_224_keeps(ceiling):
    cog = _cog()
    coarse, fine = _iou(ceiling.through_grid(cog, 28), cog), _iou(ceiling.through_grid(cog, 224), cog)
    assert fine >= 0.99 and coarse <= fine - 0.04, (coarse, fine)  # measured 0.941 against 0.998


def test_a_small_input_loses_what_a_large_one_keeps(ceiling):
    cog = _cog()
    small, large = _iou(ceiling.through_input(cog, 32), cog), _iou(ceiling.through_input(cog, 600), cog)
    assert large >= 0.99 and small <= large - 0.05, (small, large)  # measured 0.927 against 1.0


def test_on_the_overfit_images_a_28_grid_is_not_the_limit(ceiling, tiny_data, capsys):
    """What the README says of the PointRend comparison's data: the standard head's grid could hold
    these masks almost exactly, so a sharper head has little to win there."""
    rows = ceiling.ceilings(tiny_data, "val", 128, [28, 224])
    assert len(rows["grid 28 x 28"]) == 18
    grid = rows["grid 28 x 28"][:, 0]
    assert grid.mean() >= 0.98 and grid.min() >= 0.97, grid  # measured 0.989, lowest 0.978
    ceiling.main(["--data", str(tiny_data), "--img-size", "128"])
    out = capsys.readouterr().out
    assert "18 instances" in out and "grid 28 x 28" in out and "input at --img-size 128" in out
