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
        seg = self.segmentation
        if seg is None or (isinstance(seg, list) and len(seg) == 0):
            return np.zeros((height, width), dtype=np.uint8)
        if isinstance(seg, list):
            rles = mask_utils.frPyObjects(seg, height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        return mask_utils.decode(rle).astype(np.uint8)


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
