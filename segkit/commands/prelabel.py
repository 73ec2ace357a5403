"""``segkit prelabel <project URL> --checkpoint CKPT``: pre-annotate a Label Studio project, least-sure first.

Posts one prediction per task (those without one of this model's version, unless ``--all``) with a score
that is low where the model is least sure (:func:`segkit.serve.prelabel.task_score`); sort the Data Manager by
prediction score to label those first. Interrupted runs resume: the tasks already posted are skipped.

``torchrun --nproc-per-node N -m segkit prelabel ...`` splits the tasks between N processes (each on its own
GPU, or CPU threads divided between them); Label Studio is the only record, so no merge step is needed.
"""
from __future__ import annotations

import argparse
import sys

from segkit.commands import (add_key_arguments, add_tile_arguments, key_from_args, resolve_checkpoint_arg,
                             tiling_from_args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``segkit prelabel``."""
    p.add_argument("project", metavar="URL", help="the project's address as in the browser, "
                   "e.g. http://localhost:8080/projects/3")
    p.add_argument("--checkpoint", required=True,
                   help="a segkit checkpoint (best.pt) or an exported model (.xml for OpenVINO is the fast CPU choice)")
    add_key_arguments(p)
    p.add_argument("--all", dest="only_missing", action="store_false",
                   help="predict every task, even those holding a prediction of this model version already "
                        "(default: only the missing ones, so a re-run finishes an interrupted one)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="pre-annotate instances scoring at least this (default: the checkpoint's)")
    p.add_argument("--max-detections", type=int, default=100, help="most instances per image")
    add_tile_arguments(p)
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    p.add_argument("--model-version", default=None,
                   help="the predictions' model_version (default: segkit-<run>-<hash of the checkpoint>, the one "
                        "`segkit ml-backend` uses for the same file)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Pre-label; 2 when nothing could be done, 1 when some tasks failed, else 0."""
    import torch

    from segkit.models.checkpoint import CheckpointError
    from segkit.labelstudio.client import Client, LabelStudioError, parse_project_url, resolve_api_key
    from segkit.labelstudio.config import LabelConfigError
    from segkit.inference.predictor import Predictor, UnsupportedOption
    from segkit.models.checkpoint import model_version
    from segkit.serve.prelabel import least_sure, prelabel_project, sort_hint
    from segkit.inference.sharding import Ranks, cpu_threads, rank_device

    ranks = Ranks.from_env()
    if (threads := cpu_threads(ranks)) is not None:
        torch.set_num_threads(threads)
    try:
        server, project = parse_project_url(args.project)
        key = resolve_api_key(key_from_args(args))
        device = args.device or (rank_device(ranks) if ranks.distributed else None)
        resolve_checkpoint_arg(args)
        predictor = Predictor.from_checkpoint(args.checkpoint, device, args.max_detections).tile(tiling_from_args(args))
        version = args.model_version or model_version(args.checkpoint)
        with Client(server, key) as client:
            result = prelabel_project(client, project, predictor, version, args.only_missing,
                                      args.score_threshold, progress=not args.no_progress and ranks.rank == 0,
                                      shard=(ranks.rank, ranks.world))
    except (LabelStudioError, LabelConfigError, CheckpointError, OSError, UnsupportedOption) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    who = f"rank {ranks.rank}: " if ranks.distributed else ""
    print(f"{who}{len(result.posted)} tasks pre-labelled as {version}, {result.skipped} already had its prediction, "
          f"{len(result.failed)} failed")
    for task_id, why in result.failed:
        print(f"failed: task {task_id}: {why}", file=sys.stderr)
    if result.posted:
        print("least sure: " + ", ".join(f"task {t} ({s:.2f})" for t, s in least_sure(result)))
    if ranks.rank == 0:
        print(sort_hint(server, project))
    return 1 if result.failed else 0
