"""Test-time augmentation: the model looks at an image several ways (mirrored, larger, smaller) and the views vote.

Each view's detections are mapped back onto the image and grouped by class and mask IoU, one detection per
view in a group; each group becomes one object whose mask is the pixels at least half of the group's masks
cover and whose score is the group's scores summed over the number of views (a view that missed the object
counts 0), so an object only one view found ranks below one all of them found. Detectron2 and Ultralytics
flip and rescale alike; voting on the box-local masks keeps memory what one prediction needs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from segkit.inference.tiles import covered, extent, highest, iou_within
from segkit.structures.masks import Crop, InstanceMasks
from segkit.structures.prediction import Prediction

View = tuple[bool, float]  # (mirrored left-right, input size as a fraction of the model's)


@dataclass(frozen=True)
class TTA:
    """The views: the image as it is, mirrored when ``flip``, and at each of ``scales`` times the model's input
    size; detections of one class whose masks overlap by ``match`` (IoU) or more are one object."""

    flip: bool = True
    scales: tuple[float, ...] = ()
    match: float = 0.5

    def __post_init__(self):
        if any(not 0.25 <= s <= 4 for s in self.scales):
            raise ValueError(f"test-time scales are fractions of the model's input size in [0.25, 4], got {self.scales}")

    def views(self) -> list[View]:
        """The image as it is first, then the mirror, then the scales."""
        return [(False, 1.0), *([(True, 1.0)] if self.flip else []), *((False, s) for s in self.scales if s != 1)]


def predict_tta(predict: Callable[[torch.Tensor, float], Prediction], image: torch.Tensor, tta: TTA,
                max_detections: int | None = None) -> Prediction:
    """``predict`` (a (3, H, W) image and a scale of the model's input size -> :class:`Prediction`) over
    ``tta``'s views of ``image``, voted into one prediction."""
    views = tta.views()
    if len(views) == 1:
        return predict(image, 1.0)
    found = [_unflipped(predict(torch.flip(image, dims=[-1]), scale)) if mirrored else predict(image, scale)
             for mirrored, scale in views]
    voted = vote(found, tta.match)
    return voted if max_detections is None else highest(voted, max_detections)


def _unflipped(prediction: Prediction) -> Prediction:
    """A prediction of the mirrored image, mirrored back."""
    width, height = prediction.image_size
    crops = [Crop(width - c.x0 - c.mask.shape[1], c.y0, np.ascontiguousarray(c.mask[:, ::-1]))
             for c in prediction.instance_masks.crops]
    boxes = prediction.boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32) + np.array([width, 0, width, 0],
                                                                                               np.float32)
    return Prediction(boxes, prediction.labels, prediction.class_names, prediction.scores,
                      InstanceMasks(crops, height, width))


@dataclass
class _Group:
    label: int
    name: str
    crops: list[Crop] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    views: set[int] = field(default_factory=set)


def vote(found: list[Prediction], match: float = 0.5) -> Prediction:
    """One prediction from several predictions of the same image (see the module's docstring)."""
    width, height = found[0].image_size
    whole = (0, 0, width, height)
    detections = sorted(((float(p.scores[i]), int(p.labels[i]), p.class_names[i], p.instance_masks.crops[i], v)
                         for v, p in enumerate(found) for i in range(len(p))), key=lambda d: -d[0])
    groups: list[_Group] = []
    for score, label, name, crop, view in detections:
        if not crop.mask.any():
            continue
        group = next((g for g in groups if g.label == label and view not in g.views
                      and iou_within(g.crops[0], crop, whole) >= match), None)
        if group is None:
            groups.append(group := _Group(label, name))
        group.crops.append(crop)
        group.scores.append(score)
        group.views.add(view)
    objects = [(sum(g.scores) / len(found), g, covered(g.crops, (len(g.crops) + 1) // 2)) for g in groups]
    objects = sorted((o for o in objects if o[2].mask.any()), key=lambda o: -o[0])
    crops = [crop for _, _, crop in objects]
    boxes = np.array([extent(c) for c in crops], dtype=np.float32).reshape(-1, 4)
    return Prediction(boxes, np.array([g.label for _, g, _ in objects], dtype=np.int64),
                      [g.name for _, g, _ in objects], np.array([s for s, _, _ in objects], dtype=np.float32),
                      InstanceMasks(crops, height, width))
