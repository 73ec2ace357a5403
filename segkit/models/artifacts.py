"""Exported models (ONNX, OpenVINO IR, TorchScript) read back: what they are and how to run them.

Reading lives apart from writing (:mod:`segkit.inference.export`), so that loading a checkpoint
(:func:`segkit.models.checkpoint.load_checkpoint`), which also opens artifacts, needs nothing of the exporter.
The optional packages (``pip install 'segkit[export]'``) are imported only when a format needs them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

FORMATS = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".torchscript"}
SUFFIXES = {suffix: fmt for fmt, suffix in FORMATS.items()}
META_KEY = "segkit"
INSTALL_HINT = "pip install 'segkit[export]'"

# A detector run: one float (3, H, W) image -> boxes, labels, scores, mask probabilities, as tensors.
Runner = Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The (height, width) torchvision's detection transform resizes an image to in eager mode: the shorter side
    to ``min_size`` unless the longer would pass ``max_size``, each side floor(side x scale), all in double.

    Exported models take it as an input, computed here on the host: computed inside the graph, it comes out
    of float32 arithmetic (torchvision's traced resize, OpenVINO's CPU plugin) a row short for some sizes,
    and every feature after it moves."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def model_inputs(image: Any, info: dict[str, Any]) -> tuple[Any, Any]:
    """(image, size) as an exported model takes them, for a (3, H, W) float array or tensor ``image``."""
    frozen = info["export"]["frozen"]
    size = resized_size(int(image.shape[-2]), int(image.shape[-1]), frozen["min_size"], frozen["max_size"])
    return image, np.asarray(size, dtype=np.int64)


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
        _require_size_input(path, len(module.forward.schema.arguments) - 1)  # less self
        return lambda image: module(image, torch.from_numpy(model_inputs(image, info)[1]))
    if fmt == "onnx":
        ort = require_package("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        _require_size_input(path, len(session.get_inputs()))

        def run_onnx(image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            array, size = model_inputs(image.numpy(), info)
            return tuple(torch.from_numpy(a) for a in session.run(None, {"image": array, "size": size}))

        return run_onnx
    ov = require_package("openvino")
    # OpenVINO picks bf16 on CPUs that have it, which changes detections: f32 unless asked for.
    config = {"INFERENCE_PRECISION_HINT": "bf16" if info["export"].get("bf16") else "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(path, "CPU", config)
    _require_size_input(path, len(compiled.inputs))
    request = compiled.create_infer_request()

    def run(image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        result = request.infer(list(model_inputs(image.numpy(), info)))
        return tuple(torch.from_numpy(result[out].copy()) for out in compiled.outputs)

    return run


def _require_size_input(path: str, inputs: int) -> None:
    if inputs != 2:  # (image, size); segkit's exports before this one resized in the graph, wrongly for some sizes
        raise ExportError(f"{path}: exported by an earlier segkit, whose models resize some photos a row short of "
                          "what the checkpoint does; export it again from its .pt checkpoint with `segkit export`")
