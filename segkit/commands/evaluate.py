"""``segkit evaluate``: COCO AP, per-class IoU/Dice and Boundary IoU of a checkpoint on a dataset, as a table, JSON and plots.

See :mod:`segkit.evaluation.metrics` for what each number means and which score threshold it uses. A semantic
checkpoint gets per-class IoU and Dice, mIoU, mDice and pixel accuracy under the same ``semantic``
key of the JSON (:mod:`segkit.evaluation.semantic_metrics`), and its confusion matrix. What differs is
asked of the checkpoint's task (:mod:`segkit.tasks`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segkit.commands import (add_key_arguments, add_tile_arguments, add_tta_arguments, model_data_split,
                             resolve_checkpoint_arg, tiling_from_args, tta_from_args)
from segkit.data.records import ImageRecord
from segkit.data.splits import SPLITS

SPLIT_CHOICES = (*SPLITS, "all")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``segkit evaluate``."""
    p.add_argument("--checkpoint", required=True, help="a segkit checkpoint (best.pt)")
    p.add_argument("--data", default=None, help="the dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--format", default=None, help="force the export format (default: detected)")
    p.add_argument("--images", default=None, help="folder holding the images, when not beside the export")
    add_key_arguments(p, " when the data is a project URL")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="val",
                   help="the checkpoint's saved split, else the dataset's own, else all images (default: val)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="masks at least this confident count for IoU/Dice and the confusion matrix "
                        "(default: the checkpoint's); COCO AP always uses all detections")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per forward pass (default 1: more is faster on a GPU, but images padded to a common size "
                   "get slightly different outputs than alone)")
    p.add_argument("--max-detections", type=int, default=100,
                   help="most instances per image (COCO AP counts up to 100)")
    add_tile_arguments(p)
    add_tta_arguments(p)
    p.add_argument("--json", default=None, metavar="FILE", help="write the metrics as JSON")
    p.add_argument("--out", default=None, metavar="DIR", help="write confusion_matrix.png and pr_curves.png here")


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write what was asked; 2 when the checkpoint or data cannot be used."""
    from segkit.atomic import write_json
    from segkit.data.readers import DataError
    from segkit.data.splits import SplitError
    from segkit.evaluation.evaluate import evaluate_predictor
    from segkit.evaluation.metrics import BACKGROUND, EvaluateError
    from segkit.engine.plots import plot_confusion_matrix, plot_pr_curves
    from segkit.inference.predictor import Predictor, UnsupportedOption
    from segkit.models.checkpoint import CheckpointError
    from segkit.tasks import get_task
    from segkit.tasks.wording import wording

    try:
        resolve_checkpoint_arg(args)
        ckpt, records, which = _load(args)
    except (CheckpointError, DataError, EvaluateError, SplitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = list(ckpt["classes"])
    predictor = Predictor.from_loaded_checkpoint(ckpt, args.checkpoint, max_detections=args.max_detections)
    try:
        predictor.tile(tiling_from_args(args)).augment(tta_from_args(args))
    except UnsupportedOption as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    task = get_task(predictor.task)
    threshold = predictor.score_threshold if args.score_threshold is None else args.score_threshold
    evaluator = task.evaluator(records, classes, threshold)
    report = evaluate_predictor(predictor, records, evaluator, max(1, args.batch_size))

    print(f"{len(records)} images: {which}")
    print(wording(task.name).note(report, threshold, predictor.score_floor))
    print(task.format_table(report, classes))
    if args.json:
        write_json(args.json, task.json_report(report), indent=2)
    if args.out:
        out = Path(args.out)
        plot_confusion_matrix(evaluator.confusion, [BACKGROUND, *classes], out / "confusion_matrix.png",
                              wording(task.name).confusion_title.format(threshold=threshold))
        written = ["confusion_matrix.png"]
        if task.has_pr_curves:
            plot_pr_curves(report, out / "pr_curves.png")
            written.append("pr_curves.png")
        print(f"wrote {out}/{', '.join(written)}")
    return 0


def _load(args: argparse.Namespace) -> tuple[dict, list[ImageRecord], str]:
    """(checkpoint, the images to evaluate with only the model's classes, where the choice came from)."""
    from segkit.models.checkpoint import load_checkpoint
    from segkit.evaluation.metrics import EvaluateError

    ckpt = load_checkpoint(args.checkpoint)
    records, which, unknown = model_data_split(args, ckpt, args.split)
    if not records:
        raise EvaluateError(f"no images to evaluate in {which}; try --split all")
    if unknown:
        print(f"note: ground truth of classes the model does not know is ignored: "
              f"{', '.join(f'{k} ({v})' for k, v in sorted(unknown.items()))}")
    return ckpt, records, which
