"""INT8 OpenVINO models: NNCF post-training quantization calibrated on the user's training images;
and what bf16 costs in AP.

``segkit export --format openvino --int8 --data DATASET`` calls :func:`export_int8`: the f32 model is
exported, NNCF collects activation ranges on training images (as the model sees them at inference),
and box and mask AP on the val split are measured before and after. Both are recorded in the
artifact (``export.int8``), so whoever runs it can see what quantization cost. ``--bf16 --data`` does the
same for bfloat16 inference (:func:`report_bf16`, ``export.bf16_ap``).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from segkit.data.images import load_image
from segkit.data.readers import load_dataset
from segkit.data.records import ImageRecord
from segkit.data.splits import SplitError, model_split
from segkit.evaluation.evaluate import evaluate_predictor
from segkit.models.artifacts import META_KEY, ExportError, artifact_info, model_inputs, require_package
from segkit.inference.export import export, save_openvino
from segkit.inference.predictor import Predictor
from segkit.models.checkpoint import load_checkpoint
from segkit.tasks import get_task

DEFAULT_CALIBRATION_IMAGES = 50  # NNCF's statistics settle within tens of images; each costs one forward
# The ops NNCF may quantize: the network's layers (the exported graph names ops by their module path). Everything
# else is arithmetic on coordinates: decoding box deltas and scaling boxes back to the photo's pixels, which 256
# levels cannot hold (a box corner of a 1000 px photo moves in steps of ~4 px). Quantized, that arithmetic cost the
# ImageNet-started vehicles model 0.15 mask AP on its training photos and 0.056 on val; with the layers alone,
# 0.015 on val (docs/benchmarks/infer-vehicles.md).
QUANTIZED_LAYERS = r"/(backbone|rpn/head|roi_heads/(box_head|box_predictor|mask_head|mask_predictor))/"


def export_int8(checkpoint: str | os.PathLike, out: str | os.PathLike, data: str | os.PathLike,
                calibration_images: int = DEFAULT_CALIBRATION_IMAGES, max_detections: int | None = None,
                measure_ap: bool = True, show_progress: bool = True) -> Path:
    """Write an INT8 OpenVINO model of ``checkpoint`` at ``out`` (.xml), calibrated on ``data``'s train split.

    Returns the path; with ``measure_ap``, its ``export.int8`` metadata holds box and mask AP on the
    val split before and after quantization.
    """
    ov, nncf = require_package("openvino"), require_package("nncf")
    ckpt = load_checkpoint(checkpoint)
    train, val = train_val_records(ckpt, Path(data))
    if not train:
        raise ExportError(f"{data}: no training images to calibrate on")
    out = Path(out)
    with tempfile.TemporaryDirectory() as scratch:
        f32_path = export(checkpoint, "openvino", Path(scratch) / "f32.xml", max_detections)
        info = artifact_info(f32_path)
        calibration = nncf.Dataset(train[:calibration_images], lambda record: _model_input(record, info))
        # MIXED: asymmetric activations. The ReLU6 / hard-swish activations of the mobile backbones waste half of a
        # symmetric range (the vehicles model lost more mask AP with the default preset)
        layers_only = nncf.IgnoredScope(patterns=[f"^(?!{QUANTIZED_LAYERS})"], validate=False)  # re.match: a prefix
        quantized = nncf.quantize(ov.Core().read_model(str(f32_path)), calibration, ignored_scope=layers_only,
                                  subset_size=min(calibration_images, len(train)), preset=nncf.QuantizationPreset.MIXED)
        info["export"]["int8"] = {"calibration_images": min(calibration_images, len(train)), "preset": "mixed",
                                  "quantized": "layers",
                                  "calibration_split": "train", "val_images": len(val)}
        quantized.set_rt_info(json.dumps(info), [META_KEY])
        save_openvino(quantized, out)
        if val and measure_ap:
            info["export"]["int8"]["before"] = artifact_ap(f32_path, val, ckpt["classes"], show_progress)
            info["export"]["int8"]["after"] = artifact_ap(out, val, ckpt["classes"], show_progress)
            _rewrite_info(out, info)
    return out


def report_bf16(artifact: str | os.PathLike, data: str | os.PathLike, show_progress: bool = True) -> dict[str, Any]:
    """Box and mask AP of a bf16 OpenVINO ``artifact`` on ``data``'s val split, run in f32 and in bf16.

    Records ``{"val_images", "before", "after"}`` in the artifact (``export.bf16_ap``) and returns it.
    On a CPU without bf16, OpenVINO runs f32 for both and the figures are equal.
    """
    info = artifact_info(artifact)
    _, val = train_val_records(info, Path(data))
    if not val:
        raise ExportError(f"{data}: no val images to measure bf16 against f32 on")
    f32 = {**info, "export": {**info["export"], "bf16": False}}
    classes = info["classes"]
    report = {"val_images": len(val), "before": artifact_ap(Path(artifact), val, classes, show_progress, f32),
              "after": artifact_ap(Path(artifact), val, classes, show_progress, load_checkpoint(artifact))}
    _rewrite_info(Path(artifact), {**info, "export": {**info["export"], "bf16_ap": report}})
    return report


def _rewrite_info(path: Path, info: dict[str, Any]) -> None:
    """Replace an OpenVINO artifact's self-description, atomically (weights unchanged)."""
    model = require_package("openvino").Core().read_model(str(path))
    model.set_rt_info(json.dumps(info), [META_KEY])
    save_openvino(model, path)


def train_val_records(ckpt: dict[str, Any], data: Path) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, val) records of ``data``, by the checkpoint's saved split when it has one."""
    images = load_dataset(data).images
    chosen = []
    for split in ("train", "val"):
        try:
            records, _, _ = model_split(images, ckpt, split, data)
        except SplitError:
            records = []
        chosen.append(records)
    return chosen[0], chosen[1]


def _model_input(record: ImageRecord, info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A record's image as the exported model takes it: float (3, H, W) in 0..1, and the size to resize it to."""
    return model_inputs(np.asarray(load_image(record.path), dtype=np.float32).transpose(2, 0, 1) / 255.0, info)


def artifact_ap(path: Path, records: list[ImageRecord], classes: list[str], show_progress: bool,
        info: dict[str, Any] | None = None) -> dict[str, float]:
    """Box and mask AP of the artifact at ``path`` (run as ``info`` says, default its own description)."""
    predictor = Predictor.from_loaded_checkpoint(info or load_checkpoint(path), path)
    evaluator = get_task(predictor.task).evaluator(records, classes, predictor.score_threshold)
    report = evaluate_predictor(predictor, records, evaluator, show_progress=show_progress)
    return {"box_ap": report["bbox"]["AP"], "mask_ap": report["segm"]["AP"]}
