"""What a model found in one image: :class:`Prediction`. Plain numpy, no torch, so that drawing,
COCO and Label Studio conversion and the metrics can be used without a model."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segkit.records import ImageRecord, label_map


@dataclass
class Prediction:
    """Instances found in one image, sorted by score. Masks are boolean (N, H, W) at the image's size.

    Ground truth has no score: :meth:`from_record` gives it NaN scores, which the overlay draws as
    the class name alone.
    """

    boxes: np.ndarray  # (N, 4) float32 xyxy pixels
    labels: np.ndarray  # (N,) int64, 1..num_classes
    class_names: list[str]
    scores: np.ndarray  # (N,) float32; NaN for ground truth
    masks: np.ndarray  # (N, H, W) bool

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the image the masks belong to."""
        return int(self.masks.shape[2]), int(self.masks.shape[1])

    def filter(self, keep: np.ndarray) -> Prediction:
        """The instances selected by a boolean or index array."""
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep
        return Prediction(self.boxes[idx], self.labels[idx], [self.class_names[i] for i in idx],
                          self.scores[idx], self.masks[idx])

    @classmethod
    def from_record(cls, record: ImageRecord, classes: Sequence[str]) -> Prediction:
        """An image's annotated instances that have a mask, with NaN scores (ground truth has none)."""
        labels = label_map(classes)
        instances = [i for i in record.instances if i.segmentation is not None]
        masks = np.stack([i.mask(record.height, record.width).astype(bool) for i in instances]) if instances else \
            np.zeros((0, record.height, record.width), dtype=bool)
        return cls(boxes=np.array([i.bbox for i in instances], dtype=np.float32).reshape(-1, 4),
                   labels=np.array([labels[i.label] for i in instances], dtype=np.int64),
                   class_names=[i.label for i in instances],
                   scores=np.full(len(instances), np.nan, dtype=np.float32), masks=masks)
