"""segkit: train Mask R-CNN on your Label Studio or labelme annotations and serve it in a browser.

The public API (stable; everything else may change between versions)::

    from segkit import load_dataset, train, TrainConfig, Predictor, Prediction, overlay

    records = load_dataset("path/to/export")              # any export segkit reads; records.problems
    summary = train(TrainConfig(data="path/to/export"))   # runs/<name>/best.pt, last.pt, metrics.csv, ...
    predictor = Predictor.from_checkpoint(summary["best"])
    prediction = predictor("photo.jpg")                   # boxes, labels, class_names, scores, masks
    overlay("photo.jpg", prediction).save("overlay.png")

Names are imported on first use, so ``import segkit`` (and ``segkit check``) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from segkit.version import __version__

# public name -> module that defines it
_API = {
    "load_dataset": "segkit.data.readers",
    "Prediction": "segkit.structures.prediction",
    "overlay": "segkit.inference.visualize",
    "Predictor": "segkit.inference.predictor",
    "train": "segkit.engine.trainer",
    "TrainConfig": "segkit.engine.trainer",
}
__all__ = ["__version__", "load_dataset", "Prediction", "overlay", "Predictor", "train", "TrainConfig"]

if TYPE_CHECKING:
    from segkit.structures.prediction import Prediction
    from segkit.inference.predictor import Predictor
    from segkit.data.readers import load_dataset
    from segkit.engine.trainer import TrainConfig, train
    from segkit.inference.visualize import overlay


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # look it up once
        return value
    raise AttributeError(f"module 'segkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
