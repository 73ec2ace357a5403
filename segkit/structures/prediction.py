"""What a model found in one image: :class:`Prediction`. Plain numpy, no torch, so that drawing,
COCO and Label Studio conversion and the metrics can be used without a model."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segkit.data.class_map import IGNORE_INDEX, class_map
from segkit.data.records import ImageRecord, label_map
from segkit.structures.masks import Crop, InstanceMasks


class Prediction:
    """Instances found in one image, sorted by score.

    Masks are kept compact, each at the size of its box (:class:`segkit.structures.masks.InstanceMasks`, in
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

    def as_instances(self) -> Prediction:
        """Itself: the instance-shaped view :meth:`SemanticPrediction.as_instances` gives, so COCO, Label Studio and
        table writers take either prediction without asking which it is."""
        return self

    TABLE_COLUMNS = ["id", "class", "score", "x1", "y1", "x2", "y2", "area (px)"]

    def table_rows(self) -> list[list]:
        """One row per instance (:data:`TABLE_COLUMNS`): id (as in the instance PNG), class, score, xyxy box, mask area."""
        return [[i + 1, name, round(float(score), 3), *(round(float(v), 1) for v in box), int(area)]
                for i, (name, score, box, area) in enumerate(zip(self.class_names, self.scores, self.boxes,
                                                                  self.areas()))]

    def at_least(self, threshold: float) -> Prediction:
        """The instances scoring ``threshold`` or more."""
        return self.filter(self.scores >= threshold)

    def keep_classes(self, names: Sequence[str]) -> Prediction:
        """The instances of the classes ``names``."""
        return self.filter(np.array([c in names for c in self.class_names], dtype=bool))

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


class SemanticPrediction:
    """One class per pixel of one image: what a semantic model (``task: "semantic"``) predicts.

    ``class_map`` is (H, W) uint8: 0 background, ``i + 1`` for ``classes[i]`` (all the model's
    classes, present or not). ``confidence`` (per label 0..C, NaN where a class has no pixel) is the
    mean softmax probability of the winning class over its pixels; ground truth has NaN throughout.
    The instance-shaped views (``class_names``, ``areas``, :meth:`as_instances`) list the classes
    present, one "region" each, in label order.
    """

    def __init__(self, class_map: np.ndarray, classes: Sequence[str], confidence: np.ndarray | None = None):
        self.class_map = np.asarray(class_map, dtype=np.uint8)
        self.classes = list(classes)
        self.confidence = np.full(len(self.classes) + 1, np.nan, np.float32) if confidence is None else \
            np.asarray(confidence, dtype=np.float32)
        counts = np.bincount(self.class_map.ravel(), minlength=256)[: len(self.classes) + 1]
        self.pixel_counts = counts.astype(np.int64)  # per label 0..C
        self.labels = np.flatnonzero(counts[1:]).astype(np.int64) + 1  # the classes present

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"SemanticPrediction({len(self)} classes on a {self.image_size[0]}x{self.image_size[1]} image)"

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.class_map.shape[1], self.class_map.shape[0]

    @property
    def class_names(self) -> list[str]:
        return [self.classes[k - 1] for k in self.labels]

    @property
    def scores(self) -> np.ndarray:
        """Mean confidence of each class present (NaN for ground truth)."""
        return self.confidence[self.labels]

    def areas(self) -> np.ndarray:
        """Pixels of each class present."""
        return self.pixel_counts[self.labels]

    TABLE_COLUMNS = ["class", "area (px)", "share (%)", "confidence"]

    def table_rows(self) -> list[list]:
        """One row per class present (:data:`TABLE_COLUMNS`): its pixels, their share of the image (%) and the
        model's mean confidence on them, largest first."""
        total = self.class_map.size
        rows = [[name, int(area), round(100 * area / total, 2), round(float(score), 3)]
                for name, area, score in zip(self.class_names, self.areas(), self.scores)]
        return sorted(rows, key=lambda r: -r[1])

    def at_least(self, threshold: float) -> SemanticPrediction:
        """Itself: every pixel has its most probable class, there is no score to cut."""
        return self

    def keep_classes(self, names: Sequence[str]) -> SemanticPrediction:
        """The same map with classes not in ``names`` turned into background."""
        wanted = {label for label, name in enumerate(self.classes, start=1) if name in set(names)}
        drop = np.array([k not in wanted and 0 < k <= len(self.classes) for k in range(256)])
        return SemanticPrediction(np.where(drop[self.class_map], 0, self.class_map), self.classes, self.confidence)

    def as_instances(self) -> Prediction:
        """One instance per class present (its whole area, its box, its mean confidence as score):
        the shape COCO files, Label Studio pre-annotations (one brush per class) and tables expect."""
        crops = [Crop.from_dense(self.class_map == k) for k in self.labels]
        boxes = np.array([(c.x0, c.y0, c.x0 + c.mask.shape[1], c.y0 + c.mask.shape[0]) for c in crops],
                         dtype=np.float32).reshape(-1, 4)
        height, width = self.class_map.shape
        return Prediction(boxes, self.labels.copy(), self.class_names, self.scores.astype(np.float32),
                          InstanceMasks(crops, height, width))

    @classmethod
    def from_record(cls, record: ImageRecord, classes: Sequence[str]) -> SemanticPrediction:
        """An image's annotations as a class map (:func:`segkit.data.class_map.class_map`; ignore regions as background)."""
        truth = class_map(record, classes)
        truth[truth == IGNORE_INDEX] = 0
        return cls(truth, classes)
