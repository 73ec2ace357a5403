"""The command-line commands, one module each: parse arguments, call the library, print.

Each module has ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status); ``segkit.cli``
imports only the one that is asked for.
"""
from __future__ import annotations

import argparse
import sys


def add_key_arguments(parser: argparse.ArgumentParser, when: str = "") -> None:
    """``--ls-token-file`` (and the older ``--ls-token``) for a command that may read Label Studio."""
    parser.add_argument("--ls-token-file", metavar="FILE",
                        help=f"file holding the Label Studio API key{when} (default: $LABEL_STUDIO_API_KEY)")
    parser.add_argument("--ls-token", metavar="KEY", help="the key itself: visible to every user of the machine in "
                                                           "`ps`; prefer --ls-token-file or the variable")


def key_from_args(args: argparse.Namespace) -> str | None:
    """The API key ``--ls-token-file`` or ``--ls-token`` gives (None: the environment's, decided later);
    raises LabelStudioError naming a key file that cannot be read."""
    from segkit.labelstudio.client import read_key_file

    if getattr(args, "ls_token", None):
        print("warning: --ls-token shows the key to every user of this machine (ps, /proc); use --ls-token-file "
              "or $LABEL_STUDIO_API_KEY", file=sys.stderr)
        return args.ls_token
    return read_key_file(args.ls_token_file) if getattr(args, "ls_token_file", None) else None


def resolve_checkpoint_arg(args: argparse.Namespace) -> None:
    """``args.checkpoint`` as a local file, once, where the command starts: an ``hf://`` address is downloaded
    here (CheckpointError when it cannot be), and every later step reads that file."""
    from segkit.models.checkpoint import resolve_checkpoint

    if getattr(args, "checkpoint", None):
        args.checkpoint = str(resolve_checkpoint(args.checkpoint))


def add_tile_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tile`` and ``--tile-overlap``: sliced inference of large images (:mod:`segkit.inference.tiles`)."""
    parser.add_argument("--tile", type=int, default=None, metavar="PIXELS",
                        help="predict images larger than this tile by tile at full resolution, plus a whole-image "
                             "pass, merged by mask (small objects in large photos); default: whole images")
    parser.add_argument("--tile-overlap", type=float, default=0.25, metavar="FRACTION",
                        help="--tile: how much neighbouring tiles overlap (default 0.25)")


def tiling_from_args(args: argparse.Namespace):
    """The :class:`~segkit.inference.tiles.Tiling` ``--tile`` asks for, or None."""
    from segkit.inference.tiles import Tiling

    return Tiling(args.tile, args.tile_overlap) if getattr(args, "tile", None) else None
