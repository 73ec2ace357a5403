"""Data rules: what in an export training can use, and whether there is anything to learn at all.

``segkit check`` reports with them and training refuses untrainable data with them, so the two agree.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from segkit.data.readers import DataError
from segkit.data.records import DatasetRecords


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
        "trainable": not_trainable_reason(records) is None,
        **({"origin": records.origin} if records.origin else {}),
    }


def ensure_trainable(records: DatasetRecords) -> None:
    """Raise DataError saying why, when there is nothing a Mask R-CNN could learn from."""
    reason = not_trainable_reason(records)
    if reason:
        raise DataError(reason)


def not_trainable_reason(records: DatasetRecords) -> str | None:
    """Why no Mask R-CNN could learn from ``records`` (with what to do instead), or None when it can."""
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
