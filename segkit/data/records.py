"""In-memory records that every reader produces and every later stage consumes.

A reader turns an export on disk into a :class:`DatasetRecords`: images with their instances, the
class names, and the problems found on the way. Masks stay in their annotated form (polygons or
COCO RLE) and are decoded lazily with pycocotools, so reading a large export is cheap.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

# Polygons: a list of flat [x0, y0, x1, y1, ...] lists in pixels. RLE: a COCO RLE dict
# ({"size": [h, w], "counts": str | list}).
Segmentation = list[list[float]] | dict[str, Any]


@dataclass
class Problem:
    """Something wrong with the data: ``kind`` is a short stable key, ``file`` the offending file."""

    kind: str
    file: str
    detail: str
    fatal: bool = False  # True when the image or instance cannot be used at all

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "file": self.file, "detail": self.detail}


@dataclass
class Instance:
    """One annotated object. ``label`` is the class name; ``bbox`` is xyxy in pixels."""

    label: str
    segmentation: Segmentation | None  # None: a box without a mask (rectangle annotations)
    bbox: tuple[float, float, float, float]
    ann_id: Any = None
    iscrowd: bool = False

    def mask(self, height: int, width: int) -> np.ndarray:
        """Decode to a uint8 (H, W) mask with pycocotools; an empty mask when there is no segmentation."""
        rle = self._rle(height, width)
        return np.zeros((height, width), dtype=np.uint8) if rle is None else mask_utils.decode(rle).astype(np.uint8)

    def area(self, height: int, width: int) -> int:
        """The mask's pixels (counted on its RLE: no full-size mask is made)."""
        rle = self._rle(height, width)
        return 0 if rle is None else int(mask_utils.area(rle))

    def mask_in(self, window: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
        """The uint8 mask within ``window`` (x0, y0, x1, y1) of its ``height`` x ``width`` image, as ``mask()``
        cut there: polygons are drawn on the window grown to hold them (pycocotools clips a polygon at the
        canvas's edge slightly differently from inside it), so a crop of a huge photo costs its object's size."""
        x0, y0, x1, y1 = window
        seg = self.segmentation
        if not (isinstance(seg, list) and seg):
            return np.ascontiguousarray(self.mask(height, width)[y0:y1, x0:x1])
        xs, ys = [v for p in seg for v in p[0::2]], [v for p in seg for v in p[1::2]]
        cx0, cy0 = min(x0, max(0, int(min(xs)) - 1)), min(y0, max(0, int(min(ys)) - 1))
        cx1, cy1 = max(x1, min(width, int(max(xs)) + 2)), max(y1, min(height, int(max(ys)) + 2))
        shifted = [[v - (cx0 if k % 2 == 0 else cy0) for k, v in enumerate(polygon)] for polygon in seg]
        canvas = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(shifted, cy1 - cy0, cx1 - cx0)))
        return np.ascontiguousarray(canvas[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0], dtype=np.uint8)

    def _rle(self, height: int, width: int) -> dict[str, Any] | None:
        seg = self.segmentation
        if seg is None or (isinstance(seg, list) and len(seg) == 0):
            return None
        if isinstance(seg, list):
            return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        if isinstance(seg.get("counts"), list):
            return mask_utils.frPyObjects(seg, height, width)
        return seg


@dataclass
class ImageRecord:
    """One image and its instances. ``split`` is the export's own split name when it has one."""

    path: Path
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)
    image_id: Any = None
    split: str | None = None
    # Regions marked "not an object, do not judge" (labelme's ``__ignore__``), as polygons: no instance
    # comes from them; a semantic target (``segkit.data.class_map``) gives their pixels the ignore index.
    ignore: list[list[float]] = field(default_factory=list)


@dataclass
class DatasetRecords:
    """Everything a reader found: images, class names (index i -> label i + 1), problems."""

    format: str
    source: Path | str  # a str for a live Label Studio project URL
    images: list[ImageRecord]
    classes: list[str]
    problems: list[Problem] = field(default_factory=list)
    origin: dict[str, Any] | None = None  # where a live project's data came from (server, project, time)


def label_map(classes: Sequence[str]) -> dict[str, int]:
    """Class name -> label: ``classes[i]`` is label ``i + 1``, 0 is the background (torchvision's and COCO's ids)."""
    return {name: i + 1 for i, name in enumerate(classes)}


def class_key(name: str) -> str:
    """What makes two class names one class: case does not count, as Label Studio's "Shell" is a model's "shell"."""
    return name.casefold()


def restrict_to_classes(records: Sequence[ImageRecord],
                        classes: Sequence[str]) -> tuple[list[ImageRecord], dict[str, int]]:
    """Records keeping only instances of ``classes``, and how many instances of each other class went."""
    known, dropped = set(classes), {}
    out = []
    for rec in records:
        for inst in rec.instances:
            if inst.label not in known:
                dropped[inst.label] = dropped.get(inst.label, 0) + 1
        out.append(replace(rec, instances=[i for i in rec.instances if i.label in known]))
    return out, dropped


def median_side(records: Sequence[ImageRecord]) -> int | None:
    """The median shorter side of ``records``' images (None for none): the scale a model trained on them knows."""
    sides = sorted(min(r.width, r.height) for r in records)
    return int(sides[len(sides) // 2]) if sides else None
