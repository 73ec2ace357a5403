"""``segkit space``: a trained model as a complete Hugging Face Space folder; ``git push`` of it deploys it.

What the folder holds and why it is a Docker Space: :mod:`segkit.serve.space`.
"""
from __future__ import annotations

import argparse
import sys

from segkit.commands import resolve_checkpoint_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``segkit space``."""
    from segkit.serve.space import FORMATS

    p.add_argument("checkpoint", help="a segkit checkpoint (runs/<name>/best.pt)")
    p.add_argument("--out", required=True, help="the Space's folder: created, or updated in place (a clone of the "
                                                "Space keeps its git history)")
    p.add_argument("--format", default="checkpoint", choices=FORMATS,
                   help="what the Space runs: the checkpoint (eager PyTorch), or its OpenVINO export (faster on a CPU "
                        "Space; Mask R-CNN with the standard mask head)")
    p.add_argument("--space", default=None, metavar="OWNER/NAME",
                   help="the Space's id on the Hub: its title, and the push commands printed at the end")
    p.add_argument("--gpu", action="store_true",
                   help="for GPU hardware: install PyPI's torch (CUDA) instead of torch's CPU wheels")
    p.add_argument("--examples", default=None, metavar="FOLDER",
                   help="example images to offer (up to 4; default: the checkpoint's val images, when found here)")


def run(args: argparse.Namespace) -> int:
    """Write the Space and print how to push it; 2 when it cannot be written."""
    from segkit.models.checkpoint import CheckpointError
    from segkit.serve.space import SpaceError, build_space, push_commands

    try:
        resolve_checkpoint_arg(args)
        out = build_space(args.checkpoint, args.out, args.format, args.space, cpu=not args.gpu,
                          examples=args.examples)
    except (CheckpointError, SpaceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".git" not in p.parts)
    print(f"wrote the Space in {out}: {', '.join(files)}")
    print(f"try it here: cd {out} && pip install -r requirements.txt && python app.py")
    print("publish it (git push of this folder is the whole deployment):")
    print("\n".join(f"  {line}" for line in push_commands(out, args.space)))
    return 0
