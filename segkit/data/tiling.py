"""Tiled training: crops of ``tile`` pixels at native resolution, so that small objects in large photos are
learned at the size they have, not shrunk with the whole photo to the model's input size.

Most crops are placed on a random object (anywhere inside the crop), the rest anywhere (in a sparse scene,
mostly background: the negatives the model needs not to see objects everywhere). Objects cut by the crop's
edge are kept when at least :data:`MIN_VISIBLE` of them is inside, else left out, as a sliver of a car
teaches nothing and a large part of one marked as background would teach the wrong thing.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from segkit.data.records import Instance

ON_OBJECT = 0.8  # the share of crops placed on an object
MIN_VISIBLE = 0.25  # of an object's pixels, inside the crop, to keep it

Window = tuple[int, int, int, int]  # x0, y0, x1, y1


def crop_generator(epoch_seed: int, index: int) -> torch.Generator:
    """The generator of image ``index``'s crop in the epoch seeded ``epoch_seed``: the same crop whichever
    worker loads it and whatever a resumed run skipped."""
    return torch.Generator().manual_seed(epoch_seed * 1_000_003 + index)


def _uniform(low: int, high: int, generator: torch.Generator) -> int:
    """An integer in [low, high]."""
    return low + int(torch.randint(0, max(0, high - low) + 1, (), generator=generator).item())


def random_window(instances: Sequence[Instance], width: int, height: int, tile: int,
                  generator: torch.Generator) -> Window:
    """A ``tile`` x ``tile`` crop of a ``width`` x ``height`` image (the image's size where it is smaller),
    on one of ``instances`` (:data:`ON_OBJECT` of the time) or anywhere, drawn from ``generator``."""
    tw, th = min(tile, width), min(tile, height)
    if instances and torch.rand((), generator=generator).item() < ON_OBJECT:
        x0, y0, x1, y1 = instances[_uniform(0, len(instances) - 1, generator)].bbox
        # the crop holds the whole box when it fits (anywhere around it), else lies inside the box
        lo_x, hi_x = sorted((math.ceil(x1) - tw, int(x0)))
        lo_y, hi_y = sorted((math.ceil(y1) - th, int(y0)))
        x = min(max(_uniform(lo_x, hi_x, generator), 0), width - tw)
        y = min(max(_uniform(lo_y, hi_y, generator), 0), height - th)
    else:
        x, y = _uniform(0, width - tw, generator), _uniform(0, height - th, generator)
    return x, y, x + tw, y + th


def crop_instances(instances: Sequence[Instance], window: Window, width: int,
                   height: int) -> tuple[list[Instance], np.ndarray]:
    """The instances enough of which is inside ``window``, and their (N, h, w) uint8 masks there."""
    x0, y0, x1, y1 = window
    kept, masks = [], []
    for inst in instances:
        bx0, by0, bx1, by1 = inst.bbox
        if bx1 <= x0 or bx0 >= x1 or by1 <= y0 or by0 >= y1:
            continue
        mask = inst.mask_in(window, height, width)
        visible = int(mask.sum())
        if visible and visible >= MIN_VISIBLE * inst.area(height, width):
            kept.append(inst)
            masks.append(mask)
    return kept, np.stack(masks) if masks else np.zeros((0, y1 - y0, x1 - x0), np.uint8)
