"""``segkit evaluate``: COCO AP, per-class IoU/Dice and Boundary IoU of a checkpoint on a dataset, as a table, JSON and plots.

See :mod:`segkit.engine.metrics` for what each number means and which score threshold it uses. A semantic
checkpoint gets per-class IoU and Dice, mIoU, mDice and pixel accuracy under the same ``semantic``
key of the JSON (:mod:`segkit.engine.semantic`), and its confusion matrix.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segkit.data.records import ImageRecord, restrict_to_classes
from segkit.data.splits import SPLITS

SPLIT_CHOICES = (*SPLITS, "all")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``segkit evaluate``."""
    p.add_argument("--checkpoint", required=True, help="a segkit checkpoint (best.pt)")
    p.add_argument("--data", default=None, help="the dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--format", default=None, help="force the export format (default: detected)")
    p.add_argument("--images", default=None, help="folder holding the images, when not beside the export")
    p.add_argument("--ls-token", metavar="KEY", help="Label Studio API key when the data is a project URL "
                   "(default: $LABEL_STUDIO_API_KEY)")
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
    p.add_argument("--json", default=None, metavar="FILE", help="write the metrics as JSON")
    p.add_argument("--out", default=None, metavar="DIR", help="write confusion_matrix.png and pr_curves.png here")


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the table, write what was asked; 2 when the checkpoint or data cannot be used."""
    from segkit.atomic import write_json
    from segkit.models.checkpoint import CheckpointError
    from segkit.engine.metrics import BACKGROUND, EvaluateError, evaluate_predictor, format_table
    from segkit.engine.plots import plot_confusion_matrix, plot_pr_curves
    from segkit.inference.predictor import Predictor, SemanticPredictor
    from segkit.data.readers import DataError
    from segkit.data.splits import SplitError

    try:
        ckpt, records, which = _load(args)
    except (CheckpointError, DataError, EvaluateError, SplitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = list(ckpt["classes"])
    predictor = Predictor.from_loaded_checkpoint(ckpt, args.checkpoint, max_detections=args.max_detections)
    if isinstance(predictor, SemanticPredictor):
        return _run_semantic(args, predictor, records, which)
    threshold = predictor.score_threshold if args.score_threshold is None else args.score_threshold
    evaluator = evaluate_predictor(predictor, records, classes, threshold, max(1, args.batch_size))
    report = evaluator.evaluate()

    print(f"{len(records)} images: {which}")
    print(f"COCO AP: all detections (the model's internal score threshold is {predictor.score_floor:g}); "
          f"IoU/Dice/bIoU: masks with score >= {threshold:g}; bIoU: Boundary IoU, boundary "
          f"{report['boundary']['dilation_ratio']:.0%} of the image diagonal")
    print(format_table(report, classes))
    if args.json:
        write_json(args.json, report, indent=2)
    if args.out:
        out = Path(args.out)
        plot_confusion_matrix(evaluator.pixels.confusion, [BACKGROUND, *classes], out / "confusion_matrix.png",
                              f"pixels, masks with score >= {threshold:g}")
        plot_pr_curves(report, out / "pr_curves.png")
        print(f"wrote {out}/confusion_matrix.png, pr_curves.png")
    return 0


def _run_semantic(args: argparse.Namespace, predictor, records: list[ImageRecord], which: str) -> int:
    """``run`` for a semantic checkpoint: class maps against the annotations' (see :mod:`segkit.data.class_map`)."""
    from segkit.atomic import write_json
    from segkit.engine.metrics import BACKGROUND
    from segkit.engine.plots import plot_confusion_matrix
    from segkit.engine.semantic import evaluate_predictor, format_table

    evaluator = evaluate_predictor(predictor, records, predictor.classes, max(1, args.batch_size))
    report = {"semantic": evaluator.evaluate()}
    print(f"{len(records)} images: {which}")
    print("IoU/Dice: every pixel's most probable class against the annotations (crowd regions not judged)")
    print(format_table(report["semantic"], predictor.classes))
    if args.json:
        write_json(args.json, report, indent=2)
    if args.out:
        out = Path(args.out)
        plot_confusion_matrix(evaluator.confusion, [BACKGROUND, *predictor.classes], out / "confusion_matrix.png",
                              "pixels, semantic model")
        print(f"wrote {out}/confusion_matrix.png")
    return 0


def _load(args: argparse.Namespace) -> tuple[dict, list[ImageRecord], str]:
    """(checkpoint, the images to evaluate with only the model's classes, where the choice came from)."""
    from segkit.models.checkpoint import load_checkpoint
    from segkit.engine.metrics import EvaluateError
    from segkit.data.readers import load_dataset
    from segkit.data.splits import select_split

    ckpt = load_checkpoint(args.checkpoint)
    data = args.data or (ckpt.get("config") or {}).get("data")
    if not data:
        raise EvaluateError(f"{args.checkpoint} does not say which data it was trained on; pass --data")
    dataset = load_dataset(data, fmt=args.format, images_dir=args.images, api_key=args.ls_token)
    records, which = select_split(dataset.images, ckpt.get("split"), args.split, Path(data))
    if not records:
        raise EvaluateError(f"no images to evaluate in {which}; try --split all")
    records, unknown = restrict_to_classes(records, ckpt["classes"])
    if unknown:
        print(f"note: ground truth of classes the model does not know is ignored: "
              f"{', '.join(f'{k} ({v})' for k, v in sorted(unknown.items()))}")
    return ckpt, records, which
