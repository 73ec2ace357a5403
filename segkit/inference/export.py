"""Export a checkpoint to ONNX, OpenVINO or TorchScript (reading and running one: :mod:`.artifacts`).

What is exported is :func:`segkit.models.forward.detect` for one image: a float (3, H, W) image in 0..1
of any size and the (height, width) to resize it to go in (the host computes the size as the eager model
does, :func:`segkit.models.artifacts.resized_size`); boxes in the image's pixels, labels, scores and the
mask head's (N, 1, 28, 28) probabilities come out. Pasting each mask into its box stays on the host, in :func:`paste_masks`,
as for eager models, so every backend gives the same compact :class:`segkit.structures.prediction.Prediction`.

Each artifact describes itself (:func:`segkit.models.artifacts.artifact_info`): classes, image size, score threshold, the
settings frozen into the graph, segkit's version and the source checkpoint's SHA-256. So
``Predictor.from_checkpoint(path)``, and every ``--checkpoint``, runs it with no further option:

    model.onnx         ONNX, metadata in the model's metadata_props["segkit"]
    model.xml (+.bin)  OpenVINO IR, metadata in its rt_info["segkit"]
    model.torchscript  TorchScript, metadata in the archive's extra file segkit.json

The optional packages (``pip install 'segkit[export]'``) are imported only here, when needed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes

from segkit.version import __version__
from segkit.atomic import atomic_export
from segkit.models.artifacts import (FORMATS, META_KEY, ExportError, companions, model_inputs,
                                       require_package, sha256)
from segkit.models.checkpoint import load_checkpoint
from segkit.tasks.checkpoint import model_from_checkpoint

OPSET = 17


class Detector(nn.Module):
    """The exported graph: :func:`segkit.models.forward.detect` on one image, outputs as a tuple. It takes the
    image and the (height, width) to resize it to, which the host computes as the eager model does
    (:func:`segkit.models.artifacts.resized_size`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.transform, self.backbone = model.transform, model.backbone
        self.rpn, self.roi_heads = model.rpn, model.roi_heads

    def forward(self, image: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        resized = nn.functional.interpolate(self.transform.normalize(image)[None], size=(size[0], size[1]),
                                            mode="bilinear", align_corners=False)[0]
        return self._detect(image, resized)

    def _detect(self, image: Tensor, resized: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        original = (image.shape[-2], image.shape[-1])
        size = (resized.shape[-2], resized.shape[-1])
        batch = ImageList(self.transform.batch_images([resized], self.transform.size_divisible), [size])
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes)
        det = detections[0]
        boxes = resize_boxes(det["boxes"], size, original)
        return boxes, det["labels"], det["scores"], det["masks"]


class ScriptableDetector(Detector):
    """:class:`Detector` for ``torch.jit.script``, where the size's elements must be Python ints."""

    def forward(self, image: Tensor, size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        resized = nn.functional.interpolate(self.transform.normalize(image)[None],
                                            size=[int(size[0]), int(size[1])], mode="bilinear",
                                            align_corners=False)[0]
        return self._detect(image, resized)


def frozen_settings(model: nn.Module) -> dict[str, Any]:
    """The settings an export fixes in the graph: score floor, NMS, detections per image, resize."""
    heads, transform = model.roi_heads, model.transform
    return {"box_score_thresh": float(heads.score_thresh), "box_nms_thresh": float(heads.nms_thresh),
            "detections_per_img": int(heads.detections_per_img), "min_size": int(transform.min_size[0]),
            "max_size": int(transform.max_size)}


def export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike,
           max_detections: int | None = None, bf16: bool = False) -> Path:
    """Write ``checkpoint`` as a ``fmt`` artifact (see :data:`FORMATS`) at ``out``; returns its path.

    ``max_detections`` freezes a smaller detection cap (the mask head runs once per detection).
    ``bf16`` (OpenVINO only) records that the model runs in bfloat16 on CPUs that have it: faster,
    but its detections differ from f32's (bench/infer.py measures how much).
    """
    if bf16 and fmt != "openvino":
        raise ExportError("bf16 is an OpenVINO inference setting: use --format openvino")
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    ckpt = load_checkpoint(checkpoint)
    if "export" in ckpt:
        raise ExportError(f"{checkpoint} is already an exported model; export from the segkit checkpoint (.pt)")
    if ckpt.get("task", "instance") != "instance":
        raise ExportError(f"{checkpoint} is a {ckpt['task']} segmentation model; export supports Mask R-CNN "
                          "checkpoints only so far. Run it with the .pt checkpoint instead.")
    mask_head = ckpt.get("mask_head", "standard")
    if mask_head != "standard":
        raise ExportError(f"{checkpoint}: its mask head is {mask_head!r}; only the standard Mask R-CNN mask head "
                          "can be exported (ONNX, OpenVINO and TorchScript). Run it with the .pt checkpoint instead.")
    out = Path(out)
    if out.suffix.lower() != FORMATS[fmt]:
        raise ExportError(f"{out}: a {fmt} artifact must end in {FORMATS[fmt]}")
    model = model_from_checkpoint(ckpt).eval()
    if max_detections is not None:
        model.roi_heads.detections_per_img = max_detections
    info = _info(ckpt, Path(checkpoint), fmt, model)
    info["export"]["bf16"] = bf16
    write = {"onnx": _write_onnx, "openvino": _write_openvino, "torchscript": _write_torchscript}[fmt]
    detector = Detector(model).eval()
    # Written beside ``out`` and renamed over it: a re-export that fails leaves the previous one whole.
    return atomic_export(out, lambda tmp: write(detector, tmp, info), companions(out))


def save_openvino(model: Any, out: str | os.PathLike) -> Path:
    """Write an OpenVINO ``model`` as ``out`` (.xml) and its weights beside it (.bin), atomically; returns ``out``."""
    ov = require_package("openvino")
    return atomic_export(out, lambda tmp: ov.save_model(model, str(tmp), compress_to_fp16=False), companions(out))


def _info(ckpt: dict, path: Path, fmt: str, model: nn.Module) -> dict[str, Any]:
    """The artifact's self-description; the keys a checkpoint has keep their names, so commands read either."""
    return {"export": {"format": fmt, "segkit_version": __version__, "source_checkpoint": str(path),
                       "source_sha256": sha256(path), "frozen": frozen_settings(model), "opset": OPSET},
            "arch": ckpt["arch"], "classes": list(ckpt["classes"]), "img_size": int(ckpt["img_size"]),
            "score_threshold": float(ckpt.get("score_threshold", 0.5)), "epoch": ckpt.get("epoch"),
            "metrics": ckpt.get("metrics", {}), "split": ckpt.get("split"), "train_side": ckpt.get("train_side"),
            "config": {"data": (ckpt.get("config") or {}).get("data"),
                       "train_tiles": (ckpt.get("config") or {}).get("train_tiles")}}


def _example(info: dict) -> tuple[Tensor, Tensor]:
    # Not square, so the exporter cannot mistake height for width; any size runs afterwards.
    side = info["img_size"]
    image, size = model_inputs(torch.rand(3, side, side * 4 // 3), info)
    return image, torch.from_numpy(size)


# The writers below get a temporary path from atomic_export, with the artifact's own name.

def _write_onnx(detector: Detector, out: Path, info: dict) -> None:
    onnx = require_package("onnx")
    with torch.no_grad():
        # The TorchScript-based exporter: torchvision's detection models carry ONNX paths for it.
        torch.onnx.export(detector, _example(info), str(out), opset_version=OPSET, dynamo=False,
                          input_names=["image", "size"], output_names=["boxes", "labels", "scores", "mask_probs"],
                          dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "n"}, "labels": {0: "n"},
                                        "scores": {0: "n"}, "mask_probs": {0: "n"}})
    model = onnx.load(str(out))
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(info)
    onnx.save(model, str(out))


def _write_torchscript(detector: Detector, out: Path, info: dict) -> None:
    scripted = torch.jit.script(ScriptableDetector(detector))
    torch.jit.save(scripted, str(out), _extra_files={f"{META_KEY}.json": json.dumps(info)})


def _write_openvino(detector: Detector, out: Path, info: dict) -> None:
    ov = require_package("openvino")
    # Through ONNX: OpenVINO's ONNX frontend takes torchvision's exported graph with dynamic sizes.
    onnx_path = out.with_suffix(".onnx")  # in atomic_export's temporary folder, removed with it
    try:
        _write_onnx(detector, onnx_path, info)
        model = ov.convert_model(str(onnx_path))
    finally:
        onnx_path.unlink(missing_ok=True)
    model.set_rt_info(json.dumps(info), [META_KEY])
    ov.save_model(model, str(out), compress_to_fp16=False)


