"""``segkit export``: a checkpoint as an ONNX, OpenVINO or TorchScript model that describes itself.

Every ``--checkpoint`` (predict, evaluate, the demo) then takes the exported file as it is. Needs the
optional packages: ``pip install 'segkit[export]'``. The model card goes beside the file
(``model.onnx`` -> ``model.MODEL_CARD.md``), with the exported file's own AP.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segkit.commands import resolve_checkpoint_arg

FORMATS = ("onnx", "openvino", "torchscript")
CARD_AP_MAX_IMAGES = 50  # the card's AP is measured on the val split when it is this small (seconds, not hours)


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
    p.add_argument("--data", default=None, help="the dataset for --int8, and for --bf16's AP report (default for "
                                                 "--int8: the one the checkpoint was trained on)")
    p.add_argument("--calibration-images", type=int, default=50, help="--int8: training images to calibrate on")
    p.add_argument("--bf16", action="store_true",
                   help="OpenVINO: run in bfloat16 where the CPU has it (faster; detections differ from f32); "
                        "with --data, reports box and mask AP on its val split in f32 and bf16 and records them")


def run(args: argparse.Namespace) -> int:
    """Export and say what was written; 2 when the checkpoint cannot be exported or a package is missing."""
    from segkit.models.checkpoint import CheckpointError
    from segkit.models.artifacts import ExportError, artifact_info
    from segkit.inference.export import export

    from segkit.data.readers import DataError

    try:
        resolve_checkpoint_arg(args)
        if args.int8:
            path = _export_int8(args)
        else:
            path = export(args.checkpoint, args.format, args.out, args.max_detections, args.bf16)
            if args.bf16 and args.data:
                from segkit.inference.quantize import report_bf16

                report_bf16(path, args.data)
        info = artifact_info(path)
        card = _write_card(args, path, info)
    except (CheckpointError, ExportError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    frozen = ", ".join(f"{k}={v}" for k, v in info["export"]["frozen"].items())
    print(f"wrote {path} ({args.format}; {len(info['classes'])} classes; frozen: {frozen}); "
          f"run it with any --checkpoint, e.g. segkit predict IMAGES --checkpoint {path} --out preds")
    int8, bf16 = info["export"].get("int8"), info["export"].get("bf16_ap")
    if int8 and "before" in int8:
        print(f"INT8, calibrated on {int8['calibration_images']} training images; {_ap_change(int8)}")
    if bf16:
        print(f"bf16 against f32; {_ap_change(bf16)}")
    print(f"model card: {card}")
    return 0


def _ap_change(report: dict) -> str:
    b, a = report["before"], report["after"]
    return (f"val split ({report['val_images']} images): box AP {b['box_ap']:.3f} -> {a['box_ap']:.3f}, "
            f"mask AP {b['mask_ap']:.3f} -> {a['mask_ap']:.3f}")


def _export_int8(args: argparse.Namespace):
    from segkit.models.checkpoint import load_checkpoint
    from segkit.inference.export import ExportError
    from segkit.inference.quantize import export_int8

    if args.format != "openvino":
        raise ExportError("--int8 needs --format openvino")
    data = args.data or (load_checkpoint(args.checkpoint).get("config") or {}).get("data")
    if not data:
        raise ExportError(f"{args.checkpoint} does not say which data it was trained on; pass --data")
    return export_int8(args.checkpoint, args.out, data, args.calibration_images, args.max_detections)


def _write_card(args: argparse.Namespace, path: Path, info: dict) -> Path:
    """The model card beside the artifact: the run's card, and this file's own AP."""
    from segkit.engine.model_card import write_export_card

    ap, measured = _own_ap(args, Path(path), info)
    return write_export_card(args.checkpoint, path, info, ap, measured)


def _own_ap(args: argparse.Namespace, path: Path, info: dict) -> tuple[dict | None, str]:
    """The artifact's box and mask AP and what they were measured on: the INT8 or bf16 report when the export
    made one, else this file on the run's val split when that is small (as ``segkit evaluate`` does), else
    (None, why not)."""
    from segkit.inference.quantize import artifact_ap, train_val_records
    from segkit.data.readers import DataError

    export = info["export"]
    for key, what in (("int8", "the INT8 model"), ("bf16_ap", "in bfloat16")):
        if "after" in (export.get(key) or {}):
            return export[key]["after"], f"{what}, on the val split ({export[key]['val_images']} images)"
    data = args.data or (info.get("config") or {}).get("data")
    hint = f"`segkit evaluate --checkpoint {path} --split val` measures it"
    if not data or "://" in str(data) or not Path(data).exists():
        return None, f"not measured: the training data is not at hand; {hint}"
    try:
        _, val = train_val_records(info, Path(data))
    except DataError as e:
        return None, f"not measured ({e}); {hint}"
    if not val:
        return None, f"not measured: the run has no val split; {hint} on another split"
    if len(val) > CARD_AP_MAX_IMAGES:
        return None, f"not measured: the val split has {len(val)} images (export measures up to " \
                     f"{CARD_AP_MAX_IMAGES}); {hint}"
    return artifact_ap(path, val, info["classes"], show_progress=False), \
        f"this file on the run's val split ({len(val)} images), as `segkit evaluate` measures"
