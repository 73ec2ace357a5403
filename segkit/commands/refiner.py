"""``segkit refiner``: train the click-refinement head of a trained checkpoint and add it to the file.

The rest of the model is not retrained (the head learns on its frozen features: minutes on a CPU), so a
model trained without ``--interactive-head`` gains clicks that correct masks in Label Studio and in
:class:`segkit.serve.prompts.PromptEngine`. See :mod:`segkit.engine.refiner`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segkit.commands import add_key_arguments, model_data_split


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``segkit refiner``."""
    from segkit.engine.refiner import RefinerConfig

    defaults = RefinerConfig()
    p.add_argument("checkpoint", help="a segkit checkpoint of a Mask R-CNN (best.pt)")
    p.add_argument("--data", default=None, help="the dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--format", default=None, help="force the export format (default: detected)")
    p.add_argument("--images", default=None, help="folder holding the images, when not beside the export")
    add_key_arguments(p, " when the data is a project URL")
    p.add_argument("--steps", type=_positive, default=defaults.steps, help=f"training steps (default {defaults.steps})")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="write the checkpoint with its head here (default: in place)")


def run(args: argparse.Namespace) -> int:
    """Train the head on the checkpoint's train split and write the checkpoint; 2 when it cannot be used."""
    import dataclasses

    import torch

    from segkit.data.dataset import SegmentationDataset
    from segkit.data.readers import DataError
    from segkit.data.splits import SplitError
    from segkit.engine.refiner import RefinerConfig, add_refiner
    from segkit.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dataclasses.replace(RefinerConfig(), steps=args.steps, seed=args.seed)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        records, which = _train_records(args, ckpt)
        tiles = (ckpt.get("config") or {}).get("train_tiles")  # a tile-trained model saw tiles, not whole photos
        ckpt = add_refiner(ckpt, SegmentationDataset(records, ckpt["classes"], tile=tiles), cfg, device)
    except (CheckpointError, DataError, SplitError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or args.checkpoint)
    save_checkpoint({k: v for k, v in ckpt.items() if k != "segkit_version"}, out)
    stats = ckpt["refiner"]
    print(f"refinement head: {stats['steps']} steps on {stats['objects']} objects of {which} in {stats['seconds']} s "
          f"(loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f}); wrote {out}")
    return 0


def _train_records(args: argparse.Namespace, ckpt: dict) -> tuple[list, str]:
    """The images the head learns from: the checkpoint's train split, or all images of a dataset without one."""
    if ckpt.get("export") is not None:
        raise ValueError(f"{args.checkpoint} is an exported model: the head trains on a .pt checkpoint")
    if (ckpt.get("task") or "instance") != "instance":
        raise ValueError(f"{args.checkpoint}: the refinement head corrects Mask R-CNN masks; this is a "
                         f"{ckpt['task']} model")
    from segkit.data.readers import DataError

    records, which, _ = model_data_split(args, ckpt, "train")
    if not records:
        raise DataError(f"no images to train the head on in {which}")
    return records, which


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
