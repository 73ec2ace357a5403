"""``segkit predict``: segment images, folders or globs; write overlays, instance masks, COCO and Label Studio json.

The output folder's layout, the naming of files and the resuming rules are in :mod:`segkit.predict_files`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segkit.preannotations import DEFAULT_FROM_NAME, DEFAULT_TO_NAME


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``segkit predict``."""
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="images, folders (searched recursively) or globs")
    p.add_argument("--checkpoint", required=True, help="a segkit checkpoint (best.pt)")
    p.add_argument("--out", required=True, help="output folder; a re-run into it skips images already done")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="keep instances scoring at least this (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per forward pass (default 1: more is faster on a GPU, but images padded to a common size "
                   "get slightly different outputs than alone)")
    p.add_argument("--max-detections", type=int, default=100, help="most instances per image")
    p.add_argument("--from-name", default=DEFAULT_FROM_NAME,
                   help="Label Studio: name of the PolygonLabels/BrushLabels tag in the labeling config")
    p.add_argument("--to-name", default=DEFAULT_TO_NAME, help="Label Studio: name of the Image tag")
    p.add_argument("--ls-brush", action="store_true",
                   help="Label Studio: write lossless brush masks instead of editable polygons")
    p.add_argument("--image-root-url", default=None, metavar="PREFIX",
                   help="Label Studio: task image = PREFIX + the image's path relative to its source folder, "
                        "e.g. '/data/local-files/?d=photos/' for local-files storage (default: the image path)")


def run(args: argparse.Namespace) -> int:
    """Predict; 2 when nothing can be done, 1 when some images could not be read, else 0."""
    from segkit.checkpoint import CheckpointError
    from segkit.images import IMAGE_EXTENSIONS
    from segkit.predict_files import LabelStudioOptions, SourceError, find_images, predict_to_folder

    out = Path(args.out)
    ls = LabelStudioOptions(args.from_name, args.to_name, args.ls_brush, args.image_root_url)
    try:
        images = find_images(args.sources, exclude=out)
        if not images:
            raise SourceError(f"no images in {' '.join(args.sources)} "
                              f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        result = predict_to_folder(Path(args.checkpoint), images, out, args.score_threshold,
                                   args.batch_size, args.max_detections, ls)
    except (SourceError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.skipped:
        print(f"{result.skipped} of {len(images)} images already done in {out}; skipped them")
    n_instances = sum(len(e["annotations"]) for e in result.entries)
    print(f"{len(result.entries)} images, {n_instances} instances or class regions "
          f"(score >= {result.score_threshold:g}); "
          f"wrote {out}/predictions.json, labelstudio.json, overlays/, masks/")
    for path, error in result.failed:
        print(f"failed: {path}: {error}", file=sys.stderr)
    return 1 if result.failed else 0
