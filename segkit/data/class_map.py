"""Semantic ground truth from instance annotations: one class index per pixel (numpy only, no torch).

The rule, the same for training targets, validation and ``segkit evaluate``:

* background is 0, ``classes[i]`` is ``i + 1`` (:func:`segkit.data.records.label_map`, as for Mask R-CNN);
* instances are painted in annotation order, so where instances of different classes overlap the one
  drawn on top in the annotation tool (the later one) wins;
* crowd regions (COCO ``iscrowd``) and labelme's ``__ignore__`` regions (``ImageRecord.ignore``) are
  painted last with :data:`IGNORE_INDEX` (255): the loss and the metrics skip those pixels, whatever
  class they look like;
* instances without a mask (rectangles) add nothing.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from segkit.data.records import ImageRecord, label_map

IGNORE_INDEX = 255  # the loss's ignore_index and the metrics' "not judged" pixels
MAX_CLASSES = 254  # class maps are uint8 with 255 reserved: background + 254 classes


def class_map(record: ImageRecord, classes: Sequence[str], height: int | None = None,
              width: int | None = None) -> np.ndarray:
    """(H, W) uint8 class indices of ``record`` (see the module docstring for the overlap rule).

    ``height``/``width`` default to the record's; pass the decoded image's when they may differ (EXIF).
    Raises KeyError naming the class when an instance's class is not in ``classes``.
    """
    if len(classes) > MAX_CLASSES:
        raise ValueError(f"{len(classes)} classes do not fit a uint8 class map (at most {MAX_CLASSES})")
    h, w = height or record.height, width or record.width
    labels = label_map(classes)
    out = np.zeros((h, w), np.uint8)
    with_masks = [inst for inst in record.instances if inst.segmentation is not None]
    for inst in (i for i in with_masks if not i.iscrowd):
        if inst.label not in labels:
            raise KeyError(f"{record.path}: class {inst.label!r} is not one of {list(classes)}")
        out[_mask(inst, h, w, record)] = labels[inst.label]
    for inst in (i for i in with_masks if i.iscrowd):  # ignore regions win over every class
        out[_mask(inst, h, w, record)] = IGNORE_INDEX
    if record.ignore:
        out[mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(record.ignore, h, w))).astype(bool)] = \
            IGNORE_INDEX
    return out


def _mask(inst, h: int, w: int, record: ImageRecord) -> np.ndarray:
    mask = inst.mask(h, w)
    if mask.shape != (h, w):  # an RLE keeps its own size: it was drawn on another image
        raise ValueError(f"{record.path}: a {inst.label!r} mask is {mask.shape}, the image {(h, w)}")
    return mask.astype(bool)
