"""``python -m segkit <command>``: one entry point; each command lives in the module named for its job."""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> module providing add_arguments(parser) and run(args) -> int
COMMANDS = {
    "check": ("segkit.check", "validate an export and report what training would use"),
    "train": ("segkit.train", "fine-tune Mask R-CNN on an export"),
    "predict": ("segkit.batch", "predict on images, folders or globs; write overlays, masks, COCO and Label Studio json"),
    "evaluate": ("segkit.evaluate", "COCO AP and per-class IoU/Dice of a checkpoint on a dataset"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="segkit", description="Instance segmentation from your annotations.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if argv[:1] == [name]:  # import only the chosen command: `check` must not pay for torch
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
