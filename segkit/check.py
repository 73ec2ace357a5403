"""``python -m segkit check PATH``: read an export as training would, and say what is usable and what is wrong.

Exit status: 0 trainable, 1 readable but not trainable (the reason is printed), 2 unreadable input.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from typing import Any

from segkit.readers import FORMATS, DataError, load_dataset
from segkit.records import DatasetRecords

_SHOWN_PER_KIND = 10  # problems listed per kind in the human report; --json lists all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``segkit check``."""
    parser.add_argument("path", metavar="PATH", help="export file or folder (Label Studio COCO or JSON, labelme, "
                        "COCO), or a folder with train/ val/ test/ subfolders")
    parser.add_argument("--images", metavar="DIR", help="folder searched for images before the export's own folder")
    parser.add_argument("--format", choices=FORMATS, help="skip format detection")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the report")


def run(args: argparse.Namespace) -> int:
    """Print the report; 0 when trainable, 1 when not, 2 when the input cannot be read."""
    try:
        records = load_dataset(args.path, args.format, args.images)
    except DataError as e:
        if args.json:
            print(json.dumps({"error": str(e)}))
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = report(records)
    if args.json:
        print(json.dumps(result))
    else:
        print(_human(records, result))
    return 0 if result["trainable"] else 1


def report(records: DatasetRecords) -> dict[str, Any]:
    """What training would use: image and instance counts, instances per class, problems, trainable."""
    classes = dict.fromkeys(records.classes, 0)
    for image in records.images:
        for inst in image.instances:
            if inst.segmentation is not None:
                classes[inst.label] = classes.get(inst.label, 0) + 1
    return {
        "format": records.format,
        "images": len(records.images),
        "instances": sum(classes.values()),
        "classes": classes,
        "problems": [p.as_dict() for p in records.problems],
        "trainable": _not_trainable_reason(records) is None,
    }


def ensure_trainable(records: DatasetRecords) -> None:
    """Raise DataError saying why, when there is nothing a Mask R-CNN could learn from."""
    reason = _not_trainable_reason(records)
    if reason:
        raise DataError(reason)


def _not_trainable_reason(records: DatasetRecords) -> str | None:
    if any(inst.segmentation is not None for image in records.images for inst in image.instances):
        return None
    how = ("Outline objects with polygons or brushes: in Label Studio use PolygonLabels or BrushLabels in the "
           "labeling config; in labelme use Create Polygons.")
    boxes = sum(p.kind == "box_without_mask" for p in records.problems)
    if boxes:
        return (f"{records.source}: no instance has a mask: only rectangles/boxes were found ({boxes}), so there is "
                f"nothing for the mask head to learn. {how}")
    if not records.images:
        fatal = Counter(p.kind for p in records.problems if p.fatal)
        why = ", ".join(f"{n} {kind}" for kind, n in fatal.most_common())
        return f"{records.source}: no usable images" + (f" ({why})" if why else "")
    return f"{records.source}: no instance has a mask: all {len(records.images)} images are empty. {how}"


def _human(records: DatasetRecords, result: dict[str, Any]) -> str:
    lines = [f"{records.source} ({result['format']}): {result['images']} images, {result['instances']} instances, "
             f"{len(result['classes'])} classes"]
    splits = Counter(im.split for im in records.images if im.split)
    if splits:
        lines.append("  splits: " + ", ".join(f"{s} {n} images" for s, n in splits.items()))
    negatives = sum(not im.instances for im in records.images)
    if negatives:
        lines.append(f"  images without objects (used as negative examples): {negatives}")
    images_per_class: Counter = Counter()
    for im in records.images:
        images_per_class.update({inst.label for inst in im.instances})
    width = max([len("class")] + [len(c) for c in result["classes"]])
    lines += ["", f"{'class':<{width}}  instances  images"]
    lines += [f"{c:<{width}}  {n:>9}  {images_per_class[c]:>6}" for c, n in result["classes"].items()]
    by_kind = defaultdict(list)
    for p in records.problems:
        by_kind[p.kind].append(p)
    if by_kind:
        lines += ["", f"problems: {len(records.problems)}"]
    for kind, problems in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {kind} ({len(problems)})")
        lines += [f"    {p.file}: {p.detail}" for p in problems[:_SHOWN_PER_KIND]]
        if len(problems) > _SHOWN_PER_KIND:
            lines.append(f"    ... and {len(problems) - _SHOWN_PER_KIND} more (--json lists all)")
    reason = _not_trainable_reason(records)
    lines += ["", "trainable: yes" if reason is None else f"NOT trainable: {reason}"]
    return "\n".join(lines)
