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


def _tile_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a tile size in pixels or 'auto', not {text!r}") from None


def add_tile_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tile`` and ``--tile-overlap``: sliced inference of large images (:mod:`segkit.inference.tiles`)."""
    parser.add_argument("--tile", type=_tile_size, default=None, metavar="PIXELS",
                        help="predict images larger than this tile by tile at full resolution, plus a whole-image "
                             "pass, merged by mask (small objects in large photos); 'auto': tiles as large as the "
                             "model's training images, for images more than twice that; default: whole images")
    parser.add_argument("--tile-overlap", type=float, default=0.25, metavar="FRACTION",
                        help="--tile: how much neighbouring tiles overlap (default 0.25)")


def tiling_from_args(args: argparse.Namespace):
    """The :class:`~segkit.inference.tiles.Tiling` ``--tile`` asks for (its size maybe ``"auto"``), or None."""
    from segkit.inference.tiles import Tiling

    tile = getattr(args, "tile", None)
    return Tiling(tile, args.tile_overlap) if tile else None


def add_tta_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tta`` and ``--tta-scales``: test-time augmentation (:mod:`segkit.inference.tta`)."""
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: predict each image also mirrored (and at --tta-scales) and "
                             "let the views vote on each object's mask and score; costs a forward per view")
    parser.add_argument("--tta-scales", type=_tta_scale, nargs="+", default=(), metavar="FRACTION",
                        help="also predict at these fractions of the model's input size, e.g. 0.8 1.25 (in 0.25-4; "
                             "turns --tta on)")


def _tta_scale(text: str) -> float:
    try:
        scale = float(text)
    except ValueError:
        scale = 0.0
    if not 0.25 <= scale <= 4:
        raise argparse.ArgumentTypeError(f"a fraction of the model's input size in [0.25, 4], not {text!r}")
    return scale


def tta_from_args(args: argparse.Namespace):
    """The :class:`~segkit.inference.tta.TTA` ``--tta`` asks for, or None."""
    from segkit.inference.tta import TTA

    if not getattr(args, "tta", False) and not getattr(args, "tta_scales", ()):
        return None
    return TTA(flip=True, scales=tuple(args.tta_scales))


def model_data_split(args: argparse.Namespace, ckpt: dict, split: str) -> tuple[list, str, dict[str, int]]:
    """(records, where they came from, unknown classes' counts) of ``split`` of the data ``args.data`` names, or
    the data the checkpoint was trained on (the same split restored from the checkpoint); raises DataError
    when neither names any data."""
    from pathlib import Path

    from segkit.data.readers import DataError, load_dataset
    from segkit.data.splits import model_split

    data = args.data or (ckpt.get("config") or {}).get("data")
    if not data:
        raise DataError(f"{args.checkpoint} does not say which data it was trained on; pass --data")
    dataset = load_dataset(data, fmt=args.format, images_dir=args.images, api_key=key_from_args(args))
    return model_split(dataset.images, ckpt, split, Path(data))
