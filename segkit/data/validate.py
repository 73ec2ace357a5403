"""Data rules: what in an export training can use, and whether there is anything to learn at all.

``segkit check`` reports with them and training refuses untrainable data with them, so the two agree.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

from segkit.data.readers import DataError
from segkit.data.records import DatasetRecords


# An object this small (square root of its box's area) at the model's input size spans four cells of the
# finest FPN level (stride 4) and no anchor (the smallest is 32 px): it is barely learned or found.
SMALL_OBJECT_PX = 16


def object_sizes(records: DatasetRecords, img_size: int) -> list[float]:
    """Each masked instance's size (square root of its box's area) in pixels once its image is resized so that
    its shorter side is ``img_size``, as the model sees it."""
    return [math.sqrt(max(0.0, (x1 - x0) * (y1 - y0))) * img_size / min(image.width, image.height)
            for image in records.images for inst in image.instances if inst.segmentation is not None
            for x0, y0, x1, y1 in [inst.bbox]]


def small_objects_hint(sizes: list[float], img_size: int) -> str | None:
    """What to do when most objects are too small at ``img_size`` to be learned (None when they are not)."""
    if not sizes:
        return None
    median = sorted(sizes)[len(sizes) // 2]
    if median >= SMALL_OBJECT_PX:
        return None
    return (f"objects are small at the model's input size: median {median:.0f} px at --img-size {img_size} "
            f"(under {SMALL_OBJECT_PX} px the model hardly sees them). Train on tiles at full resolution "
            f"(--train-tiles {img_size}) and predict with --tile auto")


def report(records: DatasetRecords, img_size: int = 512) -> dict[str, Any]:
    """What training would use: image and instance counts, instances per class, object sizes at ``img_size``
    (the model's input size), problems, trainable."""
    classes = dict.fromkeys(records.classes, 0)
    for image in records.images:
        for inst in image.instances:
            if inst.segmentation is not None:
                classes[inst.label] = classes.get(inst.label, 0) + 1
    sizes = object_sizes(records, img_size)
    return {
        "format": records.format,
        "images": len(records.images),
        "instances": sum(classes.values()),
        "classes": classes,
        "object_px_median": round(sorted(sizes)[len(sizes) // 2], 1) if sizes else None,
        "small_objects_hint": small_objects_hint(sizes, img_size),
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
