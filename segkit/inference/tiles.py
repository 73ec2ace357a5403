"""Sliced inference: a photo much larger than the model's input, predicted tile by tile at native resolution.

The model resizes whatever it is given to its training scale, so a 40 px object in an 8000 px photo shrinks
to a few pixels and is lost. Here the photo is cut into overlapping tiles of ``size`` pixels, each predicted
at the model's scale, plus (``whole``) one pass over the photo shrunk to the model's size for objects larger
than a tile. Their detections are then merged by **mask**: two detections of one class are one object when
their masks agree (IoU >= ``match``) within the region both were predicted from (the band two tiles share,
or the tile inside the whole-image pass). Comparing there, not over whole boxes, joins the two halves of an
object cut by a seam, which box NMS (SAHI's merge) keeps as two. Masks stay box-local throughout
(:class:`~segkit.structures.masks.Crop`), and tiles are predicted one at a time, so memory follows the
objects and one tile, not the photo's megapixels.
"""
from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from segkit.data.images import downscale
from segkit.structures.masks import Crop, InstanceMasks
from segkit.structures.prediction import Prediction

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels of the original image


@dataclass(frozen=True)
class Tiling:
    """Tiles of ``size`` pixels (of the original image) overlapping by ``overlap`` of a tile; ``whole`` adds a
    pass over the whole image (shrunk to ``whole_side``) for objects larger than a tile."""

    size: int | str  # "auto": :meth:`auto` works it out for the model (see :meth:`resolved`)
    overlap: float = 0.25
    whole: bool = True
    whole_side: int = 1333  # torchvision's largest side: what the model would make of the photo anyway
    match: float = 0.5  # mask IoU, within the region both detections saw, that makes them one object
    only_above: int = 0  # images whose longer side is at most this are predicted whole

    def __post_init__(self):
        if (self.size != "auto" and (not isinstance(self.size, int) or self.size < 32)) or not 0 <= self.overlap < 1:
            raise ValueError(f"tiles need a size of at least 32 px and an overlap in [0, 1), got {self.size} "
                             f"and {self.overlap}")

    def resolved(self, info: dict) -> "Tiling":
        """This tiling, with ``"auto"`` worked out for the model ``info`` describes (a Predictor's ``info``):
        a model trained on tiles (``--train-tiles``) gets those tiles, for every image larger than one, as
        its validation was; one trained on whole photos gets tiles as large as its median training photo
        (shorter side, ``train_side``; checkpoints without it: twice the model's input size), only for
        images more than twice that: a little larger than what it learned from, it sees them whole."""
        if self.size != "auto":
            return self
        if info.get("train_tiles"):
            return dataclasses.replace(self, size=int(info["train_tiles"]))
        side = max(32, int(info.get("train_side") or 2 * int(info.get("img_size") or 800)))
        return dataclasses.replace(self, size=side, only_above=2 * side)

    def windows(self, width: int, height: int) -> list[Window]:
        """The tiles covering a ``width`` x ``height`` image, row by row; one (the image) when it fits a tile."""
        if max(width, height) <= self.only_above:
            return [(0, 0, width, height)]
        xs, ys = _starts(width, self.size, self.overlap), _starts(height, self.size, self.overlap)
        return [(x, y, min(x + self.size, width), min(y + self.size, height)) for y in ys for x in xs]


def _starts(length: int, size: int, overlap: float) -> list[int]:
    if length <= size:
        return [0]
    stride = max(1, int(size * (1 - overlap)))
    return [*range(0, length - size, stride), length - size]  # the last tile ends at the image's edge


def predict_tiled(predict: Callable[[Image.Image], Prediction], image: Image.Image, tiling: Tiling,
                  max_detections: int | None = None) -> Prediction:
    """``predict`` (one RGB image -> :class:`Prediction`) over ``tiling``'s tiles of ``image``, merged into one
    prediction of the whole image. An image that fits in one tile is predicted as it is, unchanged."""
    width, height = image.size
    windows = tiling.windows(width, height)
    if len(windows) == 1:
        return predict(image)
    found = [(_placed(predict(image.crop(window)), window, width, height), window) for window in windows]
    if tiling.whole:
        small = downscale(image, tiling.whole_side)
        found.append((_enlarged(predict(small), width, height), (0, 0, width, height)))
    merged = merge_detections(found, tiling.match)
    return merged if max_detections is None else highest(merged, max_detections)


def _placed(prediction: Prediction, window: Window, width: int, height: int) -> Prediction:
    """A tile's prediction in the coordinates of the whole image."""
    x0, y0 = window[:2]
    crops = [Crop(c.x0 + x0, c.y0 + y0, c.mask) for c in prediction.instance_masks.crops]
    boxes = prediction.boxes + np.array([x0, y0, x0, y0], dtype=np.float32)
    return Prediction(boxes, prediction.labels, prediction.class_names, prediction.scores,
                      InstanceMasks(crops, height, width))


def _enlarged(prediction: Prediction, width: int, height: int) -> Prediction:
    """A prediction of the shrunk image at the original's size (each mask scaled up on its own)."""
    small_w, small_h = prediction.image_size
    sx, sy = width / small_w, height / small_h
    crops = []
    for c in prediction.instance_masks.crops:
        x0, y0 = int(c.x0 * sx), int(c.y0 * sy)
        w = max(1, min(width, round((c.x0 + c.mask.shape[1]) * sx)) - x0) if c.mask.size else 0
        h = max(1, min(height, round((c.y0 + c.mask.shape[0]) * sy)) - y0) if c.mask.size else 0
        mask = np.asarray(Image.fromarray(c.mask).resize((w, h), Image.Resampling.NEAREST)) if w and h else c.mask
        crops.append(Crop(x0, y0, mask.astype(bool)))
    boxes = prediction.boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
    return Prediction(boxes, prediction.labels, prediction.class_names, prediction.scores,
                      InstanceMasks(crops, height, width))


@dataclass
class _Object:
    label: int
    name: str
    score: float
    seen: list[tuple[Crop, Window]] = field(default_factory=list)  # each detection merged in, and where from

    def matches(self, crop: Crop, window: Window, threshold: float) -> bool:
        return any(iou_within(crop, other, shared) >= threshold for other, where in self.seen
                   if (shared := _intersection(window, where)) is not None)


def merge_detections(found: list[tuple[Prediction, Window]], match: float = 0.5) -> Prediction:
    """One prediction of the whole image from detections made in ``found``'s windows (all in the whole image's
    coordinates): highest score first, each joins the first object of its class whose mask it matches where
    both were predicted (:class:`Tiling`'s ``match``), else starts one. An object's mask is the union of its
    detections' masks, its score the highest of theirs."""
    width, height = found[0][0].image_size
    detections = sorted(((float(p.scores[i]), int(p.labels[i]), p.class_names[i], p.instance_masks.crops[i],
                          window) for p, window in found for i in range(len(p))), key=lambda d: -d[0])
    objects: list[_Object] = []
    for score, label, name, crop, window in detections:
        if not crop.mask.any():
            continue
        same = next((o for o in objects if o.label == label and o.matches(crop, window, match)), None)
        if same is None:
            objects.append(same := _Object(label, name, score))
        same.seen.append((crop, window))
    crops = [covered([c for c, _ in o.seen]) for o in objects]
    boxes = np.array([[c.x0, c.y0, c.x0 + c.mask.shape[1], c.y0 + c.mask.shape[0]] for c in crops],
                     dtype=np.float32).reshape(-1, 4)
    return Prediction(boxes, np.array([o.label for o in objects], dtype=np.int64), [o.name for o in objects],
                      np.array([o.score for o in objects], dtype=np.float32), InstanceMasks(crops, height, width))


def _intersection(a: Window, b: Window) -> Window | None:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def extent(crop: Crop) -> Window:
    """The window a crop covers."""
    return crop.x0, crop.y0, crop.x0 + crop.mask.shape[1], crop.y0 + crop.mask.shape[0]


def paint(crop: Crop, area: Window) -> np.ndarray:
    """``crop``'s mask within ``area`` (False outside the crop)."""
    out = np.zeros((area[3] - area[1], area[2] - area[0]), dtype=bool)
    inside = _intersection(extent(crop), area)
    if inside is not None:
        x0, y0, x1, y1 = inside
        out[y0 - area[1]:y1 - area[1], x0 - area[0]:x1 - area[0]] = \
            crop.mask[y0 - crop.y0:y1 - crop.y0, x0 - crop.x0:x1 - crop.x0]
    return out


def iou_within(a: Crop, b: Crop, region: Window) -> float:
    """IoU of two masks counting only the pixels inside ``region``."""
    ea, eb = _intersection(extent(a), region), _intersection(extent(b), region)
    if ea is None or eb is None or _intersection(ea, eb) is None:
        return 0.0
    area = (min(ea[0], eb[0]), min(ea[1], eb[1]), max(ea[2], eb[2]), max(ea[3], eb[3]))
    ma, mb = paint(a, area), paint(b, area)
    union = np.count_nonzero(ma | mb)
    return np.count_nonzero(ma & mb) / union if union else 0.0


def covered(crops: list[Crop], votes: int = 1) -> Crop:
    """The pixels at least ``votes`` of ``crops`` cover, cut to where they are (1: their union)."""
    extents = [extent(c) for c in crops]
    area = (min(e[0] for e in extents), min(e[1] for e in extents), max(e[2] for e in extents),
            max(e[3] for e in extents))
    count = np.zeros((area[3] - area[1], area[2] - area[0]), dtype=np.uint16)
    for c in crops:
        count += paint(c, area)
    inside = Crop.from_dense(count >= votes)
    return Crop(inside.x0 + area[0], inside.y0 + area[1], inside.mask) if inside.mask.size else inside


def highest(prediction: Prediction, n: int) -> Prediction:
    """The ``n`` highest-scoring instances of ``prediction``."""
    keep = np.argsort(-prediction.scores, kind="stable")[:n]
    return Prediction(prediction.boxes[keep], prediction.labels[keep], [prediction.class_names[i] for i in keep],
                      prediction.scores[keep], prediction.instance_masks.select(keep))
