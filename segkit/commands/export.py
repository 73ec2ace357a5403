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
    p.add_argument("--int8", action="store_true",
                   help="OpenVINO: INT8, calibrated with NNCF on --data's training images; reports box and "
                        "mask AP on its val split before and after, and records them in the model")
    p.add_argument("--data", default=None, help="the dataset for --int8 (default: the one the checkpoint was trained on)")
    p.add_argument("--calibration-images", type=int, default=50, help="--int8: training images to calibrate on")
    p.add_argument("--bf16", action="store_true",
                   help="OpenVINO: run in bfloat16 where the CPU has it (faster; detections differ from f32)")


def run(args: argparse.Namespace) -> int:
    """Export and say what was written; 2 when the checkpoint cannot be exported or a package is missing."""
    from segkit.checkpoint import CheckpointError
    from segkit.export import ExportError, artifact_info, export

    from segkit.readers import DataError

    try:
        if args.int8:
            path = _export_int8(args)
        else:
            path = export(args.checkpoint, args.format, args.out, args.max_detections, args.bf16)
        info = artifact_info(path)
    except (CheckpointError, ExportError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    frozen = ", ".join(f"{k}={v}" for k, v in info["export"]["frozen"].items())
    print(f"wrote {path} ({args.format}; {len(info['classes'])} classes; frozen: {frozen}); "
          f"run it with any --checkpoint, e.g. segkit predict IMAGES --checkpoint {path} --out preds")
    int8 = info["export"].get("int8")
    if int8 and "before" in int8:
        b, a = int8["before"], int8["after"]
        print(f"INT8, calibrated on {int8['calibration_images']} training images; val split ({int8['val_images']} "
              f"images): box AP {b['box_ap']:.3f} -> {a['box_ap']:.3f}, mask AP {b['mask_ap']:.3f} -> {a['mask_ap']:.3f}")
    return 0


def _export_int8(args: argparse.Namespace):
    from segkit.checkpoint import load_checkpoint
    from segkit.export import ExportError
    from segkit.quantize import export_int8

    if args.format != "openvino":
        raise ExportError("--int8 needs --format openvino")
    data = args.data or (load_checkpoint(args.checkpoint).get("config") or {}).get("data")
    if not data:
        raise ExportError(f"{args.checkpoint} does not say which data it was trained on; pass --data")
    return export_int8(args.checkpoint, args.out, data, args.calibration_images, args.max_detections)
