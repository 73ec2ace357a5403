"""``segkit check PATH``: read an export as training would, and say what is usable and what is wrong.

Exit status: 0 trainable, 1 readable but not trainable (the reason is printed), 2 unreadable input.
Imports no torch, so it answers in a moment.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from typing import Any

from segkit.commands import add_key_arguments, key_from_args
from segkit.data.readers import FORMATS, DataError, load_dataset
from segkit.data.records import DatasetRecords
from segkit.data.validate import not_trainable_reason, report

_SHOWN_PER_KIND = 10  # problems listed per kind in the human report; --json lists all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``segkit check``."""
    parser.add_argument("path", metavar="PATH", help="export file or folder (Label Studio COCO or JSON, labelme, "
                        "COCO), a folder with train/ val/ test/ subfolders, or a Label Studio project URL")
    parser.add_argument("--images", metavar="DIR", help="folder searched for images before the export's own folder")
    parser.add_argument("--format", choices=FORMATS, help="skip format detection")
    parser.add_argument("--img-size", type=int, default=512,
                        help="the model's input size (shorter side) to judge object sizes at (train's default: 512)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the report")
    add_key_arguments(parser, " for a project URL")


def run(args: argparse.Namespace) -> int:
    """Print the report; 0 when trainable, 1 when not, 2 when the input cannot be read."""
    try:
        records = load_dataset(args.path, args.format, args.images, api_key=key_from_args(args))
    except DataError as e:
        if args.json:
            print(json.dumps({"error": str(e)}))
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = report(records, args.img_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(_human(records, result))
    return 0 if result["trainable"] else 1


def _human(records: DatasetRecords, result: dict[str, Any]) -> str:
    lines = [f"{records.source} ({result['format']}): {result['images']} images, {result['instances']} instances, "
             f"{len(result['classes'])} classes"]
    if records.origin:
        o = records.origin
        lines.append(f"  Label Studio project {o['project']} ({o.get('title')}), exported {o['exported_at']}: "
                     f"{o['images_downloaded']} images downloaded, {o['images_unchanged']} unchanged in {o['cache']}")
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
    if result["small_objects_hint"]:
        lines += ["", f"hint: {result['small_objects_hint']}"]
    reason = not_trainable_reason(records)
    lines += ["", "trainable: yes" if reason is None else f"NOT trainable: {reason}"]
    return "\n".join(lines)
