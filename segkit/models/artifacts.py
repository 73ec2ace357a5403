"""Exported models (ONNX, OpenVINO IR, TorchScript) read back: what they are and how to run them.

Reading lives apart from writing (:mod:`segkit.inference.export`), so that loading a checkpoint
(:func:`segkit.models.checkpoint.load_checkpoint`), which also opens artifacts, needs nothing of the exporter.
The optional packages (``pip install 'segkit[export]'``) are imported only when a format needs them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

FORMATS = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".torchscript"}
SUFFIXES = {suffix: fmt for fmt, suffix in FORMATS.items()}
META_KEY = "segkit"
INSTALL_HINT = "pip install 'segkit[export]'"

# A detector run: one float (3, H, W) image -> boxes, labels, scores, mask probabilities, as tensors.
Runner = Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


class ExportError(RuntimeError):
    """A model that cannot be exported, or an optional package that is missing; the message says what to do."""


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported model (by its suffix) rather than a segkit checkpoint."""
    return Path(path).suffix.lower() in SUFFIXES


def companions(path: str | os.PathLike) -> list[Path]:
    """The files an artifact at ``path`` needs beside it: an OpenVINO model's weights (.bin)."""
    path = Path(path)
    return [path.with_suffix(".bin")] if path.suffix.lower() == FORMATS["openvino"] else []


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_package(name: str):
    """Import an optional package, or raise ExportError saying how to install it."""
    try:
        return __import__(name)
    except ImportError:
        raise ExportError(f"{name} is not installed; exported models need the optional packages: "
                          f"{INSTALL_HINT}") from None


def artifact_info(path: str | os.PathLike) -> dict[str, Any]:
    """The self-description written by :func:`export`; ExportError when ``path`` is not a readable artifact."""
    path = Path(path)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt == "onnx":
        onnx = require_package("onnx")
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        text = props.get(META_KEY)
    elif fmt == "openvino":
        model = require_package("openvino").Core().read_model(str(path))
        text = model.get_rt_info([META_KEY]).astype(str) if model.has_rt_info([META_KEY]) else None
    elif fmt == "torchscript":
        extra = {f"{META_KEY}.json": ""}
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        text = extra[f"{META_KEY}.json"] or None
    else:
        raise ExportError(f"{path}: not an exported model (expected {', '.join(SUFFIXES)})")
    if not text:
        raise ExportError(f"{path}: not exported by segkit (no {META_KEY!r} metadata)")
    return json.loads(text)


def load_runner(path: str | os.PathLike, info: dict[str, Any], threads: int | None = None) -> Runner:
    """A function running the artifact at ``path`` on one image, with the backend its format needs."""
    fmt = info["export"]["format"]
    path = str(path)
    if fmt == "torchscript":
        module = torch.jit.load(path, map_location="cpu").eval()
        return lambda image: module(image)
    if fmt == "onnx":
        ort = require_package("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return lambda image: tuple(torch.from_numpy(a) for a in session.run(None, {"image": image.numpy()}))
    ov = require_package("openvino")
    # OpenVINO picks bf16 on CPUs that have it, which changes detections: f32 unless asked for.
    config = {"INFERENCE_PRECISION_HINT": "bf16" if info["export"].get("bf16") else "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(path, "CPU", config)
    request = compiled.create_infer_request()

    def run(image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        result = request.infer({0: image.numpy()})
        return tuple(torch.from_numpy(result[out].copy()) for out in compiled.outputs)

    return run
