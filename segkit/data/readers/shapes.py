"""Turn annotated geometry into validated :class:`Instance` objects, whatever the export format.

Every reader converts its shapes to pixel polygons, a COCO RLE or a binary mask and calls the
functions here, so the checks (degenerate, out of bounds, zero area) are the same for all formats.
Boxes come from the rasterised mask so that box and mask always agree and are never empty.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segkit.data.records import ImageRecord, Instance, Problem

# Coordinates this far outside the image are float noise from the annotation tool, not a mistake.
_TOLERANCE_PX = 0.5


class Context:
    """Where an annotation came from, for problem messages: the export file and an id text."""

    def __init__(self, file: str, what: str, problems: list[Problem]):
        self.file, self.what, self.problems = file, what, problems

    def note(self, kind: str, detail: str, fatal: bool = False) -> None:
        self.problems.append(Problem(kind, self.file, f"{self.what}: {detail}", fatal))


def polygon_instance(
    label: str, polygons: list[list[float]], width: int, height: int, ann_id: Any, ctx: Context, iscrowd: bool = False
) -> Instance | None:
    """Instance from flat pixel polygons: drop degenerate ones, clip to the image; None if nothing is left."""
    kept, degenerate, outside = [], 0, False
    for poly in polygons:
        try:
            pts = [float(v) for v in poly]
        except (TypeError, ValueError):
            pts = []
        if len(pts) < 6 or len(pts) % 2 or not all(math.isfinite(v) for v in pts):
            degenerate += 1
            continue
        xy = list(zip(pts[0::2], pts[1::2]))
        lo_x, lo_y, hi_x, hi_y = -_TOLERANCE_PX, -_TOLERANCE_PX, width + _TOLERANCE_PX, height + _TOLERANCE_PX
        outside |= any(not (lo_x <= x <= hi_x and lo_y <= y <= hi_y) for x, y in xy)
        xy = clip_polygon(xy, width, height)
        if len(xy) >= 3:
            kept.append([v for p in xy for v in p])
    if degenerate:
        fate = "the object is dropped" if not kept else "the rest of the object is kept"
        detail = f"'{label}': {degenerate} of {len(polygons)} polygons have fewer than 3 points; {fate}"
        ctx.note("degenerate_polygon", detail, not kept)
    if outside:
        fate = "it lies entirely outside; dropped" if not kept else "clipped to it"
        ctx.note("out_of_bounds", f"'{label}' extends outside the {width}x{height} image; {fate}", not kept)
    if not kept:
        if not degenerate and not outside:
            ctx.note("zero_area", f"'{label}' has no polygon; dropped", True)
        return None
    rle = mask_utils.merge(mask_utils.frPyObjects(kept, height, width))
    return _finish(label, kept, rle, ann_id, iscrowd, ctx)


def rle_instance(
    label: str, rle: dict, width: int, height: int, ann_id: Any, ctx: Context, iscrowd: bool = False
) -> Instance | None:
    """Instance from a COCO RLE (compressed or uncompressed counts); resized if its size is not the image's."""
    try:
        h, w = (int(v) for v in rle["size"])
        compact = mask_utils.frPyObjects(rle, h, w) if isinstance(rle["counts"], list) else dict(rle)
        if isinstance(compact["counts"], str):
            compact["counts"] = compact["counts"].encode()
        if (h, w) != (height, width):
            return mask_instance(label, mask_utils.decode(compact), width, height, ann_id, ctx, iscrowd)
    except (KeyError, TypeError, ValueError) as e:
        ctx.note("invalid_annotation", f"unreadable RLE mask ({e}); dropped", True)
        return None
    return _finish(label, _jsonable(compact), compact, ann_id, iscrowd, ctx)


def mask_instance(
    label: str, mask: np.ndarray, width: int, height: int, ann_id: Any, ctx: Context, iscrowd: bool = False
) -> Instance | None:
    """Instance from a binary (H, W) mask; a mask of another size is stretched to the image (nearest)."""
    mask = np.asarray(mask) > 0
    if mask.shape != (height, width):
        ctx.note("size_mismatch", f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}; mask resized")
        rows = (np.arange(height) * mask.shape[0] // max(height, 1)).clip(0, mask.shape[0] - 1)
        cols = (np.arange(width) * mask.shape[1] // max(width, 1)).clip(0, mask.shape[1] - 1)
        mask = mask[rows][:, cols] if mask.size else np.zeros((height, width), bool)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return _finish(label, _jsonable(rle), rle, ann_id, iscrowd, ctx)


def box_without_mask(label: str, box_xyxy: tuple[float, float, float, float], ctx: Context) -> None:
    """Record a rectangle: reported, but not used, since Mask R-CNN needs a mask for every object."""
    x0, y0, x1, y1 = (round(v, 1) for v in box_xyxy)
    ctx.note("box_without_mask", f"'{label}' is a box [{x0}, {y0}, {x1}, {y1}] without a mask; not used for training",
             True)


def clip_polygon(points: list[tuple[float, float]], width: float, height: float) -> list[tuple[float, float]]:
    """Sutherland-Hodgman: the part of a polygon inside [0, width] x [0, height]."""
    edges = [(0, 0.0, 1), (0, float(width), -1), (1, 0.0, 1), (1, float(height), -1)]  # (axis, limit, inside side)
    for axis, limit, side in edges:
        if not points:
            break
        out = []
        for i, cur in enumerate(points):
            prev = points[i - 1]
            cur_in, prev_in = (cur[axis] - limit) * side >= 0, (prev[axis] - limit) * side >= 0
            if cur_in != prev_in:
                t = (limit - prev[axis]) / (cur[axis] - prev[axis])
                cross = (prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1]))
                out.append((limit, cross[1]) if axis == 0 else (cross[0], limit))
            if cur_in:
                out.append(cur)
        points = out
    return points


def _finish(label: str, segmentation: Any, rle: dict, ann_id: Any, iscrowd: bool, ctx: Context) -> Instance | None:
    if mask_utils.area(rle) == 0:
        ctx.note("zero_area", f"'{label}' covers no pixel; dropped", True)
        return None
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    box = (x, y, x + w, y + h)
    return Instance(label=label, segmentation=segmentation, bbox=box, ann_id=ann_id, iscrowd=bool(iscrowd))


def _jsonable(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def image_record(
    path: Path, width: int, height: int, instances: list[Instance], n_objects: int, image_id: Any, ctx: Context
) -> ImageRecord | None:
    """The record of one image, or None when it had objects but none is usable.

    Such an image is left out rather than kept as a negative: its objects are there, only their
    annotation is unusable, and training on it would teach the model that they are background.
    An image that was annotated with no objects at all is a valid negative and is kept.
    """
    if n_objects and not instances:
        ctx.note("no_usable_instances", f"none of its {n_objects} objects is usable; image left out", True)
        return None
    return ImageRecord(path=path, width=width, height=height, instances=instances, image_id=image_id)
