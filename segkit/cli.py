"""``segkit <command>`` (also ``python -m segkit``): one entry point; each command lives in ``segkit/commands/``."""
from __future__ import annotations

import argparse
import importlib
import sys

from segkit.version import __version__

# command -> help; module segkit.commands.<command> provides add_arguments(parser) and run(args) -> int
COMMANDS = {
    "check": "validate an export and report what training would use",
    "train": "fine-tune Mask R-CNN (or a semantic model: --task semantic) on an export",
    "predict": "predict on images, folders or globs; write overlays, masks, COCO and Label Studio json",
    "evaluate": "COCO AP and per-class IoU/Dice of a checkpoint on a dataset",
    "export": "write a checkpoint as an ONNX, OpenVINO or TorchScript model that any --checkpoint runs",
    "ml-backend": "serve a checkpoint as a Label Studio ML backend (pre-annotations, retraining)",
    "prelabel": "pre-annotate a Label Studio project, scored so the least-sure tasks can go first",
    "refiner": "train the click-refinement head of a trained checkpoint (clicks that correct masks)",
    "space": "write a checkpoint as a complete Hugging Face Space folder (git push deploys it)",
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the command, return its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="segkit", description="Instance segmentation from your annotations.")
    parser.add_argument("--version", action="version", version=f"segkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv[:1] == [name]:  # import only the chosen command: `check` must not pay for torch
            _command(name).add_arguments(p)
    args = parser.parse_args(argv)
    return _command(args.command).run(args) or 0


def _command(name: str):
    return importlib.import_module(f"segkit.commands.{name.replace('-', '_')}")


if __name__ == "__main__":
    sys.exit(main())
