"""``segkit predict``: segment images, folders or globs; write overlays, instance masks, COCO and Label Studio json.

The output folder's layout, the naming of files and the resuming rules are in :mod:`segkit.inference.predict_files`.
Under ``torchrun`` the ranks share the images (:mod:`segkit.inference.sharding`); ``--ray`` runs them through a
Ray Data actor pool instead, from a folder or an object-store prefix (:mod:`segkit.inference.ray_predict`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from segkit.commands import (add_tile_arguments, add_tta_arguments, resolve_checkpoint_arg, tiling_from_args,
                             tta_from_args)
from segkit.labelstudio.preannotations import DEFAULT_FROM_NAME, DEFAULT_TO_NAME

if TYPE_CHECKING:
    from segkit.inference.predict_files import FolderResult, LabelStudioOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``segkit predict``."""
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="images, folders (searched recursively) or globs")
    p.add_argument("--checkpoint", required=True, help="a segkit checkpoint (best.pt), or hf://owner/repo/path/best.pt "
                                                         "(downloaded from the Hugging Face Hub)")
    p.add_argument("--out", required=True, help="output folder; a re-run into it skips images already done")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="keep instances scoring at least this (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per forward pass (default 1: more is faster on a GPU, but images padded to a common size "
                   "get slightly different outputs than alone)")
    p.add_argument("--max-detections", type=int, default=100, help="most instances per image")
    add_tile_arguments(p)
    add_tta_arguments(p)
    p.add_argument("--from-name", default=DEFAULT_FROM_NAME,
                   help="Label Studio: name of the PolygonLabels/BrushLabels tag in the labeling config")
    p.add_argument("--to-name", default=DEFAULT_TO_NAME, help="Label Studio: name of the Image tag")
    p.add_argument("--ls-brush", action="store_true",
                   help="Label Studio: write lossless brush masks instead of editable polygons")
    p.add_argument("--image-root-url", default=None, metavar="PREFIX",
                   help="Label Studio: task image = PREFIX + the image's path relative to its source folder, "
                        "e.g. '/data/local-files/?d=photos/' for local-files storage (default: the image path)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: torch's; under torchrun the cores divided by "
                        "--nproc-per-node)")
    ray = p.add_argument_group("Ray Data (pip install 'segkit[ray]')")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="predict with a Ray actor pool: on the cluster at ADDRESS ('auto', 'ray://host:10001'), "
                          "or a local Ray without one; SOURCE is then one folder or a URI prefix "
                          "(s3://bucket/photos/, gs://..., file:///...)")
    ray.add_argument("--workers", type=int, default=1, help="--ray: actors, each with its own model (default 1)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0,
                     help="--ray: GPUs per actor (default 0: CPU actors of --cpus-per-worker cores)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0,
                     help="--ray: CPU cores per actor, also its torch threads (default 1)")
    ray.add_argument("--no-overlays", action="store_true", help="--ray: write no overlays/ (masks/ and json only)")


def run(args: argparse.Namespace) -> int:
    """Predict; 2 when nothing can be done, 1 when some images could not be read, else 0."""
    from segkit.models.checkpoint import CheckpointError, load_checkpoint, task_of
    from segkit.inference.predict_files import LabelStudioOptions, SourceError
    from segkit.inference.predictor import UnsupportedOption, refuse_unsupported

    ls = LabelStudioOptions(args.from_name, args.to_name, args.ls_brush, args.image_root_url)
    try:
        # an hf:// checkpoint is downloaded here, once: every later step (and every Ray worker) reads a file
        resolve_checkpoint_arg(args)
        tiling, tta = tiling_from_args(args), tta_from_args(args)
        ckpt = load_checkpoint(args.checkpoint)  # said here, not by each rank or Ray actor
        refuse_unsupported(task_of(ckpt), "export" in ckpt, tiling, tta)
        if args.ray is not None:
            from segkit.inference.ray_predict import predict_with_ray

            return predict_with_ray(args, ls, tiling, tta)
        return _predict_here(args, ls, tiling, tta)
    except (SourceError, CheckpointError, UnsupportedOption) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _predict_here(args: argparse.Namespace, ls: LabelStudioOptions, tiling, tta) -> int:
    """This process's part: all of it, or under torchrun its rank's share (rank 0 writes the json files)."""
    import torch

    from segkit.data.images import IMAGE_EXTENSIONS
    from segkit.inference.predict_files import SourceError, find_images, predict_to_folder
    from segkit.inference.sharding import Ranks, cpu_threads, rank_device

    out = Path(args.out)
    images = find_images(args.sources, exclude=out)
    if not images:
        raise SourceError(f"no images in {' '.join(args.sources)} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    ranks = Ranks.from_env()
    threads = cpu_threads(ranks, args.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    ranks.join()
    try:
        result = predict_to_folder(Path(args.checkpoint), images, out, args.score_threshold, args.batch_size,
                                   args.max_detections, ls, ranks, rank_device(ranks) if ranks.distributed else None,
                                   tiling, tta)
    finally:
        ranks.leave()
    for path, error in result.failed:
        print(f"failed: {path}: {error}", file=sys.stderr)
    if ranks.distributed:
        print(f"rank {ranks.rank} of {ranks.world}: predicted {result.predicted} images", flush=True)
    if ranks.rank == 0:
        _report(result, len(images), out)
    return 1 if result.failed else 0


def _report(result: FolderResult, n_images: int, out: Path) -> None:
    if result.skipped:
        print(f"{result.skipped} of {n_images} images already done in {out}; skipped them")
    n_instances = sum(len(e["annotations"]) for e in result.entries)
    print(f"{len(result.entries)} images, {n_instances} instances or class regions "
          f"(score >= {result.score_threshold:g}); "
          f"wrote {out}/predictions.json, labelstudio.json, overlays/, masks/")
