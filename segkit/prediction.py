"""What a model found in one image: :class:`Prediction`. Plain numpy, no torch, so that drawing,
COCO and Label Studio conversion and the metrics can be used without a model."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segkit.masks import Crop, InstanceMasks
from segkit.records import ImageRecord, label_map


class Prediction:
    """Instances found in one image, sorted by score.

    Masks are kept compact, each at the size of its box (:class:`segkit.masks.InstanceMasks`, in
    ``instance_masks``); ``masks`` makes the full-size boolean (N, H, W) array on request, which on
    a large photo costs N times its megapixels. ``masks`` given to the constructor may be either.

    Ground truth has no score: :meth:`from_record` gives it NaN scores, which the overlay draws as
    the class name alone.
    """

    def __init__(self, boxes: np.ndarray, labels: np.ndarray, class_names: list[str], scores: np.ndarray,
                 masks: InstanceMasks | np.ndarray):
        self.boxes = boxes  # (N, 4) float32 xyxy pixels
        self.labels = labels  # (N,) int64, 1..num_classes
        self.class_names = class_names
        self.scores = scores  # (N,) float32; NaN for ground truth
        self.instance_masks = masks if isinstance(masks, InstanceMasks) else InstanceMasks.from_dense(masks)

    def __len__(self) -> int:
        return len(self.scores)

    def __repr__(self) -> str:
        return f"Prediction({len(self)} instances on a {self.image_size[0]}x{self.image_size[1]} image)"

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool at the image's size, made on each access: prefer ``instance_masks``."""
        return self.instance_masks.dense()

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the image the masks belong to."""
        return self.instance_masks.width, self.instance_masks.height

    def areas(self) -> np.ndarray:
        """(N,) int64 mask areas in pixels."""
        return self.instance_masks.areas()

    def filter(self, keep: np.ndarray) -> Prediction:
        """The instances selected by a boolean or index array."""
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep
        return Prediction(self.boxes[idx], self.labels[idx], [self.class_names[i] for i in idx],
                          self.scores[idx], self.instance_masks.select(idx))

    @classmethod
    def from_record(cls, record: ImageRecord, classes: Sequence[str]) -> Prediction:
        """An image's annotated instances that have a mask, with NaN scores (ground truth has none)."""
        labels = label_map(classes)
        instances = [i for i in record.instances if i.segmentation is not None]
        # one full-size mask at a time, cropped at once
        masks = InstanceMasks([Crop.from_dense(i.mask(record.height, record.width)) for i in instances],
                              record.height, record.width)
        return cls(boxes=np.array([i.bbox for i in instances], dtype=np.float32).reshape(-1, 4),
                   labels=np.array([labels[i.label] for i in instances], dtype=np.int64),
                   class_names=[i.label for i in instances],
                   scores=np.full(len(instances), np.nan, dtype=np.float32), masks=masks)
