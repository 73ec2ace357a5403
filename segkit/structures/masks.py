"""Instance masks kept at the size of their box: :class:`InstanceMasks`.

A Mask R-CNN mask is a 28 x 28 grid stretched over its box, so everything outside the box is
background. Keeping only the box region (a crop and where it sits) makes memory and time grow with
the objects, not with the image's megapixels: 100 masks on a 4096 x 2731 photo take the area of
their boxes instead of 100 full-size images. Full-size masks are made only when a caller asks
(:meth:`InstanceMasks.dense`), and COCO RLE is written straight from the crops (:meth:`InstanceMasks.rle`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as mask_utils


class Crop(NamedTuple):
    """One instance: ``mask`` (bool, h x w) covers rows ``y0..y0+h`` and columns ``x0..x0+w`` of the image."""

    x0: int
    y0: int
    mask: np.ndarray

    @classmethod
    def from_dense(cls, mask: np.ndarray) -> Crop:
        """A full-size (H, W) mask cut to the rows and columns it touches (empty: a 0 x 0 crop)."""
        mask = np.asarray(mask, dtype=bool)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if len(rows) == 0:
            return cls(0, 0, np.zeros((0, 0), dtype=bool))
        return cls(int(cols[0]), int(rows[0]), mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].copy())

    @property
    def window(self) -> tuple[slice, slice]:
        """The (rows, columns) slices of the image that the crop covers."""
        h, w = self.mask.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)


class InstanceMasks:
    """N boolean masks of one (height, width) image, each stored as a :class:`Crop`."""

    def __init__(self, crops: Sequence[Crop], height: int, width: int):
        self.crops = list(crops)
        self.height, self.width = int(height), int(width)

    @classmethod
    def from_dense(cls, masks: np.ndarray) -> InstanceMasks:
        """From (N, H, W) masks; each is cropped to the rows and columns it touches."""
        masks = np.asarray(masks, dtype=bool)
        return cls([Crop.from_dense(m) for m in masks], masks.shape[1], masks.shape[2])

    def __len__(self) -> int:
        return len(self.crops)

    def select(self, idx: np.ndarray | Sequence[int]) -> InstanceMasks:
        """The masks at integer indices ``idx``, in that order."""
        return InstanceMasks([self.crops[int(i)] for i in idx], self.height, self.width)

    def dense(self, i: int | None = None) -> np.ndarray:
        """Mask ``i`` at full image size (H, W), or all of them (N, H, W) when ``i`` is None."""
        if i is None:
            out = np.zeros((len(self), self.height, self.width), dtype=bool)
            for k, crop in enumerate(self.crops):
                out[k][crop.window] = crop.mask
            return out
        out = np.zeros((self.height, self.width), dtype=bool)
        out[self.crops[i].window] = self.crops[i].mask
        return out

    def areas(self) -> np.ndarray:
        """(N,) int64 pixel counts."""
        return np.array([np.count_nonzero(c.mask) for c in self.crops], dtype=np.int64)

    def rle(self, i: int) -> dict[str, Any]:
        """Mask ``i`` as a JSON-able COCO RLE of the full image, identical to encoding :meth:`dense`.

        COCO RLE runs down the columns of the whole image. A crop's runs start and end at
        ``x * H + y``; consecutive runs that touch (a crop as tall as the image) are merged, then
        pycocotools compresses the counts, so the string is exactly what ``mask.encode`` gives.
        """
        x0, y0, mask = self.crops[i]
        h = self.height
        # A zero row above and below each column: every run then has a start and an end inside it.
        padded = np.zeros((mask.shape[0] + 2, mask.shape[1]), dtype=np.int8)
        padded[1:-1] = mask
        # Transposed, so nonzero() lists the changes column by column, as RLE runs; row r of the diff
        # is where crop row r starts (0 -> 1) or is the first row after a run (1 -> 0).
        cols, rows = np.nonzero(np.diff(padded, axis=0).T)
        edges = (cols.astype(np.int64) + x0) * h + (rows.astype(np.int64) + y0)
        starts, ends = edges[0::2], edges[1::2]
        joined = starts[1:] == ends[:-1]  # a run that goes on at the top of the next column
        starts = np.concatenate([starts[:1], starts[1:][~joined]])
        ends = np.concatenate([ends[:-1][~joined], ends[-1:]])
        bounds = np.concatenate([[0], np.stack([starts, ends], axis=1).ravel(), [h * self.width]])
        counts = np.diff(bounds)
        if len(counts) > 1 and counts[-1] == 0:  # the image ends inside a run: no trailing zeros
            counts = counts[:-1]
        rle = mask_utils.frPyObjects({"counts": counts.tolist(), "size": [h, self.width]}, h, self.width)
        rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON
        return rle

