"""``segkit export``: a checkpoint as an ONNX, OpenVINO or TorchScript model that describes itself.

Every ``--checkpoint`` (predict, evaluate, the demo) then takes the exported file as it is. Needs the
optional packages: ``pip install 'segkit[export]'``.
"""
from __future__ import annotations

import argparse
import sys

FORMATS = ("onnx", "openvino", "torchscript")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``segkit export``."""
    p.add_argument("--checkpoint", required=True, help="a segkit checkpoint (best.pt)")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, help="the file: .onnx, .xml (OpenVINO; its .bin is written beside) "
                                                "or .torchscript")
    p.add_argument("--max-detections", type=int, default=None,
                   help="most instances per image, frozen in the model (default: the checkpoint's, 100)")
    p.add_argument("--bf16", action="store_true",
                   help="OpenVINO: run in bfloat16 where the CPU has it (faster; detections differ from f32)")


def run(args: argparse.Namespace) -> int:
    """Export and say what was written; 2 when the checkpoint cannot be exported or a package is missing."""
    from segkit.checkpoint import CheckpointError
    from segkit.export import ExportError, artifact_info, export

    try:
        path = export(args.checkpoint, args.format, args.out, args.max_detections, args.bf16)
        info = artifact_info(path)
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    frozen = ", ".join(f"{k}={v}" for k, v in info["export"]["frozen"].items())
    print(f"wrote {path} ({args.format}; {len(info['classes'])} classes; frozen: {frozen}); "
          f"run it with any --checkpoint, e.g. segkit predict IMAGES --checkpoint {path} --out preds")
    return 0
