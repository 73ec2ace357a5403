"""Interactive prompts answered by the user's own Mask R-CNN: a box or clicks in, masks out.

Label Studio's auto-annotation sends what the annotator drew as ``params.context`` (a rectangle, or
smart keypoints: positive clicks, and negative ones with ``is_positive: false``), in percent of the
image; :func:`prompts_from_context` reads it into :class:`Prompt` s, and a :class:`PromptEngine` answers
them with masks at the image's size.

Why it is fast: the first prompt on an image runs the model once (backbone, RPN, heads, at a low score
threshold) and keeps what the heads need in a :class:`FeatureCache`: the FPN features, the sizes, and
every detection with its mask. A further prompt on that image runs only the box and mask heads on one
to three boxes (a box prompt, or a click where nothing was detected), or nothing at all (a click on
a detection), never the backbone.

Clicks that correct a mask: with a checkpoint that has a click-refinement head
(:mod:`segkit.models.refiner`), the clicks after an object's first (or after a box) go to the head with the
object's current mask, which it corrects: a positive click on a missed part adds it, a negative click in a
false part removes it. Every step is a pure function of the image, the model and the clicks so far, so the
steps are memoized by that sequence (:meth:`PromptEngine.refine`): two annotators never see each other's
state, and a request that repeats a sequence and adds a click costs one step of the head.

Coordinates: boxes are (x0, y0, x1, y1) and points (x, y) in the pixels of the image given, continuous,
pixel (i, j) covering [i, i + 1) x [j, j + 1), as torchvision's boxes and mask paste have them.
"""
from __future__ import annotations

import math
import threading
import uuid
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou

from segkit.data.images import ImageInput
from segkit.structures.masks import Crop, InstanceMasks
from segkit.structures.prediction import Prediction
from segkit.models.forward import box_detections, image_tensors, mask_probs, paste_masks
from segkit.models.refiner import click_maps, image_in_grid, mask_in_grid, to_grid, with_clicks
from segkit.inference.predictor import Predictor
from segkit.data.records import class_key

CLICK_THRESHOLD = 0.05  # detections a click may pick: low, since the annotator's click says where to look
REFINE_IOU = 0.5  # a prompt box this close to a detection takes the detection's box for its mask
FALLBACK_SCALES = (1 / 16, 1 / 8, 1 / 4)  # square sides, of the image's shorter side, tried around a lone click
MIN_FALLBACK_SIDE = 4.0  # pixels: the mask head needs a few pixels of box to say anything
ROI_MARGIN = 0.1  # of the side: an object's region around its mask (the head learned boxes jittered by 15%)
STEP_CACHE = 256  # refinement steps kept (a mask crop each), across images and annotators

# Label Studio region types read as prompts; other types (polygons, brushes, choices) are not prompts.
PROMPT_TYPES = {"rectanglelabels": "box", "rectangle": "box", "keypointlabels": "point", "keypoint": "point"}


class PromptMask(NamedTuple):
    """One answer: a full-size bool ``mask`` (H, W), its class index ``label`` (1..C) and a ``score`` in 0..1."""

    mask: np.ndarray
    label: int
    score: float


@dataclass(frozen=True)
class Prompt:
    """One region of ``params.context``: ``kind`` "box" or "point", its ``value`` in percent as Label Studio
    sends it (x, y, and for boxes width, height, rotation), the annotator's ``label`` (a label of the
    labeling config, or None) and, for points, whether the click is ``positive``."""

    kind: str
    value: Mapping[str, float]
    label: str | None = None
    positive: bool = True

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The box in the pixels of a ``width`` x ``height`` image (see :func:`rect_to_box`)."""
        return rect_to_box(self.value, width, height)

    def point(self, width: int, height: int) -> tuple[float, float]:
        """The point in the pixels of a ``width`` x ``height`` image (see :func:`keypoint_to_point`)."""
        return keypoint_to_point(self.value, width, height)


@dataclass
class ImageFeatures:
    """What the heads need to answer prompts on one image, from one full pass of the model.

    Memory is mostly ``features``: 256 channels over 1/4 + 1/16 + ... of the model's input, about
    90 MB (float32) at torchvision's 800 x 1333, 1.5 MB at 128 x 170.
    """

    features: dict[str, Tensor]  # the FPN's maps of the one image (batch of 1)
    image_size: tuple[int, int]  # (height, width) of the model's input, after its resize
    original_size: tuple[int, int]  # (height, width) of the image given
    boxes: Tensor  # (N, 4) detections of the full pass, in the image's pixels, sorted by score
    model_boxes: Tensor  # the same in the model's input pixels
    labels: Tensor  # (N,) int64 class indices
    scores: Tensor  # (N,)
    # the model's normalized input (1, 3, h, w), kept for the refinement head only: 3 values a pixel, as much as a
    # stride-16 FPN's features (a ResNet FPN's: about 7 times more)
    image: Tensor | None
    # Their masks at the image's size, by index, made only for detections under a click: a box needs none
    # (a first box prompt costs no more than a plain prediction) and a click a few, not all 100
    crops: dict[int, Crop] = field(default_factory=dict)


class RefineState(NamedTuple):
    """One object after some clicks: its region ``roi`` (x0, y0, x1, y1 in image pixels), its mask, class and score."""

    roi: tuple[float, float, float, float]
    crop: Crop
    label: int
    score: float


class FeatureCache:
    """A small LRU of :class:`ImageFeatures` (or of refinement steps), keyed by (key, model version); safe
    across threads.

    The model version is part of the key, so a retrained model never answers from another model's
    features; :meth:`clear` drops everything (e.g. when memory is wanted back).
    """

    def __init__(self, size: int = 8):
        if size < 1:
            raise ValueError(f"cache size must be at least 1, got {size}")
        self.size = size
        self._entries: OrderedDict[tuple[Hashable, str], ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Hashable, str]) -> ImageFeatures | None:
        """The entry for ``key``, now the most recently used; None when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[Hashable, str], entry: ImageFeatures) -> None:
        """Keep ``entry``, dropping the least recently used beyond :attr:`size`."""
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry (a new model is served, or the memory is wanted back)."""
        with self._lock:
            self._entries.clear()

    def keys(self) -> list[tuple[Hashable, str]]:
        """The keys held, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries


class PromptEngine:
    """Box and click prompts on images, answered by a :class:`segkit.inference.predictor.Predictor`'s eager Mask R-CNN
    (standard or PointRend mask head).

    ``version`` names the model in cache keys: engines sharing a ``cache`` must pass their model's version
    (the backend's ``model_version``); the default is unique to this engine. ``click_threshold`` is the
    lowest score of a detection a click may pick.
    """

    def __init__(self, predictor: Predictor, version: str | None = None, cache: FeatureCache | None = None,
                 cache_size: int = 8, click_threshold: float = CLICK_THRESHOLD, steps: FeatureCache | None = None):
        """``steps`` memoizes refinement steps (shared like ``cache`` by engines of one model version)."""
        _check_model(predictor)
        self.predictor = predictor
        self.model = predictor.model
        self.refiner = getattr(predictor, "refiner", None)
        self.version = version if version is not None else f"engine-{uuid.uuid4().hex}"
        self.cache = cache if cache is not None else FeatureCache(cache_size)
        self.steps = steps if steps is not None else FeatureCache(STEP_CACHE)
        self.click_threshold = click_threshold

    @property
    def classes(self) -> list[str]:
        return self.predictor.classes

    @torch.inference_mode()
    def features(self, image_key: Hashable, image: ImageInput) -> ImageFeatures:
        """The image's :class:`ImageFeatures`: from the cache, or from one full pass of the model.

        ``image_key`` must name the image's content (a task id and URL, a path): a cached entry of
        another size than ``image`` is recomputed, one of the same size is trusted.
        """
        key = (image_key, self.version)
        entry = self.cache.get(key)
        if entry is not None and _size_of(image) in (None, entry.original_size):
            return entry
        entry = self._full_pass(image_tensors([image], self.predictor.device)[0])
        self.cache.put(key, entry)
        return entry

    @torch.inference_mode()
    def box(self, image_key: Hashable, image: ImageInput, box: Sequence[float],
            label: int | None = None) -> PromptMask:
        """The object in ``box`` (x0, y0, x1, y1 in the image's pixels) as a full-size mask, with its class and score.

        The class is ``label`` (1..C) when the annotator chose one, else the box head's most likely
        foreground class for the box as a proposal; the score is the box head's probability of that
        class. The mask is the mask head's, for that class, over the detection's box when one of the
        full pass overlaps the prompt at IoU >= :data:`REFINE_IOU` (the model's own box for the object,
        already regressed and through NMS), else over the prompt box; then cut to the prompt box, which
        the annotator drew as the object's extent. Raises ``ValueError`` for a box with no area in the image.
        """
        return self._box(self.features(image_key, image), box, label)

    @torch.inference_mode()
    def clicks(self, image_key: Hashable, image: ImageInput, positives: Sequence[Sequence[float]],
               negatives: Sequence[Sequence[float]] = (),
               labels: Sequence[int | None] | None = None) -> list[PromptMask]:
        """One mask per positive click (x, y in the image's pixels); none for a click nothing answers.

        A click takes the most confident detection of the full pass (score >= ``click_threshold``) whose
        mask holds it and holds no negative click; two clicks picking one detection give it once. With
        none, the mask head runs on squares centred on the click (:data:`FALLBACK_SCALES` of the image's
        shorter side), each for the box head's most likely class of its square, and the one whose mask
        holds the click and no negative click, with the highest mean probability over its own foreground
        (the mask head's pixels above 0.5), is the answer, that mean its score. A click gets no mask
        when the mask head leaves the clicked pixel at or under 0.5 at every scale, or every such mask
        holds a negative click.

        ``labels`` (one per positive click, a class index or None) sets the answer's class and puts
        detections of that class first.
        """
        return self._clicks(self.features(image_key, image), positives, negatives, labels)

    @torch.inference_mode()
    def refine(self, image_key: Hashable, image: ImageInput, clicks: Sequence[tuple[float, float, bool]],
               box: Sequence[float] | None = None, label: int | None = None,
               negatives: Sequence[Sequence[float]] = ()) -> PromptMask | None:
        """One object, corrected click by click by the checkpoint's refinement head.

        ``clicks`` are (x, y, positive) in the image's pixels, in the order given. The object starts as the
        answer to ``box`` (:meth:`box`) or, without one, to its first click, which must be positive
        (:meth:`clicks`, ``negatives`` steering that first pick; where nothing answers it, from no mask in
        a square around it); each further click then corrects the mask: the head sees the object's region
        (grown to hold positive clicks outside it; a box stays the region and cuts the mask), all clicks so
        far and the previous mask. None when no positive click starts an object. Raises ``ValueError`` when
        the checkpoint has no refinement head.
        """
        self._need_refiner()
        entry = self.features(image_key, image)
        state = self._refine(image_key, entry, clicks, box, label, negatives)
        if state is None:
            return None
        return PromptMask(InstanceMasks([state.crop], *entry.original_size).dense(0), state.label, state.score)

    @torch.inference_mode()
    def predict(self, image_key: Hashable, image: ImageInput, prompts: Sequence[Prompt],
                label_classes: Mapping[str, int] | None = None) -> Prediction:
        """All of ``prompts`` on one image as a :class:`Prediction`: one instance per box, one per answered
        positive click (negative clicks only steer the clicks), empty masks left out.

        With a refinement head, clicks correct objects instead (:meth:`refine`): a click inside an object's
        region (a box, or the region of an object a click started), the latest object first, corrects that
        object; a positive click elsewhere starts a new object; a negative click elsewhere only steers later
        first clicks.

        ``label_classes`` maps the labeling config's labels to class indices (1..C); by default a label
        is the class of the same name, ignoring case. A label it lacks leaves the class to the model.
        """
        entry = self.features(image_key, image)
        height, width = entry.original_size
        lookup = {class_key(k): v for k, v in (label_classes or self._default_labels()).items()}

        def class_of(p: Prompt) -> int | None:
            return lookup.get(class_key(p.label)) if p.label is not None else None

        if self.refiner is not None:
            found = self._refined_objects(image_key, entry, prompts, class_of)
            return prompt_prediction(found, self.classes, (height, width))
        found = [self._box(entry, p.box(width, height), class_of(p)) for p in prompts if p.kind == "box"]
        points = [p for p in prompts if p.kind == "point"]
        positives = [p for p in points if p.positive]
        found += self._clicks(entry, [p.point(width, height) for p in positives],
                              [p.point(width, height) for p in points if not p.positive],
                              [class_of(p) for p in positives])
        return prompt_prediction(found, self.classes, (height, width))

    def _default_labels(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes, start=1)}

    def _refined_objects(self, image_key: Hashable, entry: ImageFeatures, prompts: Sequence[Prompt],
                         class_of) -> list[PromptMask]:
        """Prompts grouped into objects and each refined (the rules: :meth:`predict`)."""
        height, width = entry.original_size
        objects = [{"box": p.box(width, height), "label": class_of(p), "clicks": [], "negatives": ()}
                   for p in prompts if p.kind == "box"]
        states: list[RefineState | None] = [None] * len(objects)
        negatives: list[tuple[float, float]] = []
        for p in (p for p in prompts if p.kind == "point"):
            x, y = p.point(width, height)
            regions = [s.roi if s is not None else obj["box"] for s, obj in zip(states, objects)]  # None: no object
            target = next((i for i in reversed(range(len(objects))) if regions[i] is not None
                           and _inside((x, y), regions[i])), None)
            if target is None and not p.positive:
                negatives.append((x, y))
                continue
            if target is None:
                objects.append({"box": None, "label": class_of(p), "clicks": [], "negatives": tuple(negatives)})
                states.append(None)
                target = len(objects) - 1
            objects[target]["clicks"].append((x, y, p.positive))
            obj = objects[target]
            states[target] = self._refine(image_key, entry, obj["clicks"], obj["box"], obj["label"], obj["negatives"])
        for i, obj in enumerate(objects):  # boxes without clicks
            if states[i] is None and obj["box"] is not None:
                states[i] = self._refine(image_key, entry, [], obj["box"], obj["label"], ())
        return [PromptMask(InstanceMasks([s.crop], height, width).dense(0), s.label, s.score)
                for s in states if s is not None]

    def _refine(self, image_key: Hashable, entry: ImageFeatures, clicks: Sequence[tuple[float, float, bool]],
                box: Sequence[float] | None, label: int | None,
                negatives: Sequence[Sequence[float]]) -> RefineState | None:
        """The object's state after ``clicks``, from the longest memoized prefix of the sequence (:meth:`refine`)."""
        clicks = tuple((float(x), float(y), bool(positive)) for x, y, positive in clicks)
        base = (image_key, entry.original_size, None if box is None else tuple(float(v) for v in box), label,
                tuple((float(x), float(y)) for x, y in negatives))
        state, done = None, len(clicks)
        while state is None and done >= 0:
            state = self.steps.get(((*base, clicks[:done]), self.version))
            done -= state is None
        if state is None:
            state, done = self._start(entry, clicks, box, label, negatives)
            if state is None:
                return None
            self.steps.put(((*base, clicks[:done]), self.version), state)
        for k in range(done + 1, len(clicks) + 1):
            state = self._correct(entry, state, clicks[:k], box)
            self.steps.put(((*base, clicks[:k]), self.version), state)
        return state

    def _start(self, entry: ImageFeatures, clicks: Sequence[tuple[float, float, bool]], box: Sequence[float] | None,
               label: int | None, negatives: Sequence[Sequence[float]]) -> tuple[RefineState | None, int]:
        """(the object's first state, how many clicks made it): the box's answer; the first click's; or, where nothing
        answers that click, the head's answer to it from no mask in a square around it."""
        height, width = entry.original_size
        if box is not None:
            answer = self._box(entry, box, label)
            roi = tuple(_clamped_box(box, width, height, self.predictor.device)[0].tolist())
            return RefineState(roi, Crop.from_dense(answer.mask), answer.label, answer.score), 0
        if not clicks or not clicks[0][2]:
            return None, 0
        x, y, _ = clicks[0]
        answers = self._clicks(entry, [(x, y)], negatives, [label])
        if answers:
            crop = Crop.from_dense(answers[0].mask)
            if crop.mask.size:
                roi = _grown((crop.x0, crop.y0, crop.x0 + crop.mask.shape[1], crop.y0 + crop.mask.shape[0]),
                             width, height)
                return RefineState(roi, crop, answers[0].label, answers[0].score), 1
        squares = _squares((x, y), width, height, self.predictor.device)
        if len(squares) == 0:
            return None, 0
        square = squares[len(squares) // 2:len(squares) // 2 + 1]
        if label is not None:
            cls = self._check_label(label)
        else:
            cls = int(self._class_probs(entry, square)[0, 1:].argmax()) + 1
        empty = RefineState(tuple(square[0].tolist()), Crop(0, 0, np.zeros((0, 0), bool)), cls, 0.0)
        return self._correct(entry, empty, clicks[:1], None), 1  # the square is the first click's: keyed with it

    @torch.inference_mode()
    def correct(self, image_key: Hashable, image: ImageInput, state: RefineState,
                clicks: Sequence[tuple[float, float, bool]], box: Sequence[float] | None = None) -> RefineState:
        """One answer of the refinement head: ``state``'s mask corrected by all of ``clicks`` (x, y, positive),
        the last being the new one; with ``box`` (the object's prompt box, whose region ``state.roi`` is) the
        region stays as it is and the mask is cut to it. The step :meth:`refine` takes per click, not memoized."""
        self._need_refiner()
        return self._correct(self.features(image_key, image), state, clicks, box)

    def _need_refiner(self) -> None:
        if self.refiner is None:
            raise ValueError(f"{self.predictor.info.get('checkpoint', 'this checkpoint')} has no click-refinement "
                             "head: train one with `segkit train --interactive-head` (or `segkit refiner CHECKPOINT` "
                             "for a trained model)")

    def _correct(self, entry: ImageFeatures, state: RefineState, clicks: Sequence[tuple[float, float, bool]],
                 box: Sequence[float] | None) -> RefineState:
        height, width = entry.original_size
        grid, device = self.refiner.grid, self.predictor.device
        positives = [(x, y) for x, y, positive in clicks if positive]
        roi = state.roi if box is not None else _holding(state.roi, positives, width, height)
        in_grid = [(x, y, p) for (x, y), (_, _, p) in zip(to_grid([c[:2] for c in clicks], roi, grid), clicks)]
        maps = click_maps(in_grid, grid)
        if state.crop.mask.size:
            previous = mask_in_grid(torch.from_numpy(state.crop.mask), (state.crop.x0, state.crop.y0), roi, grid)
            previous = (previous > 0.5).float()  # binary, as the head learned it (and no creep at the edges)
        else:
            previous = torch.zeros(grid, grid)
        roi_tensor = torch.tensor([roi], dtype=torch.float32, device=device)
        model_box = resize_boxes(roi_tensor, entry.original_size, entry.image_size)
        pooled = self.refiner.pooled(entry.features, [model_box], [entry.image_size])
        image = image_in_grid(entry.image, model_box, grid)
        probs = torch.sigmoid(self.refiner(pooled, image, maps[None].to(device), previous[None, None].to(device)))
        probs = with_clicks(probs, in_grid)
        crop = paste_masks(probs, roi_tensor, height, width).crops[0]
        if box is not None:
            crop = Crop.from_dense(_cut_to_box(InstanceMasks([crop], height, width).dense(0), roi))
        return RefineState(roi, crop, state.label, _foreground_confidence(probs[0]))

    def _clicks(self, entry: ImageFeatures, positives: Sequence[Sequence[float]],
                negatives: Sequence[Sequence[float]], labels: Sequence[int | None] | None) -> list[PromptMask]:
        labels = list(labels) if labels is not None else [None] * len(positives)
        if len(labels) != len(positives):
            raise ValueError(f"{len(labels)} labels for {len(positives)} positive clicks")
        height, width = entry.original_size
        negative_pixels = [_pixel(p, width, height) for p in negatives]
        answers, picked = [], set()
        for point, label in zip(positives, labels):
            pixel = _pixel(point, width, height)
            found = self._detection_at(entry, pixel, negative_pixels, label)
            if found is None:
                answer = self._fallback(entry, point, pixel, negative_pixels, label)
            elif found in picked:
                continue
            else:
                picked.add(found)
                answer = PromptMask(InstanceMasks([entry.crops[found]], height, width).dense(0),
                                    _class(label, entry.labels[found]),
                                    float(entry.scores[found]))
            if answer is not None:
                answers.append(answer)
        return answers

    def _full_pass(self, image: Tensor) -> ImageFeatures:
        """:func:`segkit.models.forward.detect`'s steps on one image at ``click_threshold``, keeping the features."""
        model, original = self.model, (int(image.shape[-2]), int(image.shape[-1]))
        batch, _ = model.transform([image])
        features = model.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = model.rpn(batch, features)
        heads, sizes = model.roi_heads, batch.image_sizes
        boxes, scores, labels = box_detections(heads, features, proposals, sizes, self.click_threshold)
        in_image = resize_boxes(boxes[0], sizes[0], original)
        return ImageFeatures(features, tuple(sizes[0]), original, in_image, boxes[0], labels[0], scores[0],
                             batch.tensors if self.refiner is not None else None)

    def _detection_crops(self, entry: ImageFeatures, indices: list[int]) -> dict[int, Crop]:
        """The masks of detections ``indices``, each made once per cached image (the mask head is per box)."""
        todo = [i for i in indices if i not in entry.crops]
        if todo:
            idx = torch.tensor(todo, device=entry.boxes.device)
            probs = mask_probs(self.model.roi_heads, entry.features, [entry.model_boxes[idx]], [entry.labels[idx]],
                               [entry.image_size])[0]
            entry.crops.update(zip(todo, paste_masks(probs, entry.boxes[idx], *entry.original_size).crops))
        return entry.crops

    def _box(self, entry: ImageFeatures, box: Sequence[float], label: int | None) -> PromptMask:
        height, width = entry.original_size
        prompt = _clamped_box(box, width, height, self.predictor.device)
        probs = self._class_probs(entry, prompt)[0]
        chosen = self._check_label(label) if label is not None else int(probs[1:].argmax()) + 1
        refined = self._refined(entry, prompt)
        mask = self._masks(entry, refined, torch.tensor([chosen], device=prompt.device)).dense(0)
        return PromptMask(_cut_to_box(mask, prompt[0].tolist()), chosen, float(probs[chosen]))

    def _class_probs(self, entry: ImageFeatures, boxes: Tensor) -> Tensor:
        """(n, C + 1) class probabilities of the box head for ``boxes`` (image pixels) as proposals."""
        heads = self.model.roi_heads
        proposals = [resize_boxes(boxes, entry.original_size, entry.image_size)]
        pooled = heads.box_roi_pool(entry.features, proposals, [entry.image_size])
        logits, _ = heads.box_predictor(heads.box_head(pooled))
        return logits.softmax(-1)

    def _masks(self, entry: ImageFeatures, boxes: Tensor, labels: Tensor) -> InstanceMasks:
        return paste_masks(self._mask_probs(entry, boxes, labels), boxes, *entry.original_size)

    def _mask_probs(self, entry: ImageFeatures, boxes: Tensor, labels: Tensor) -> Tensor:
        """(n, 1, M, M) mask probabilities of ``labels`` over ``boxes`` (image pixels), PointRend's or torchvision's."""
        model_boxes = resize_boxes(boxes, entry.original_size, entry.image_size)
        return mask_probs(self.model.roi_heads, entry.features, [model_boxes], [labels], [entry.image_size])[0]

    def _refined(self, entry: ImageFeatures, prompt: Tensor) -> Tensor:
        """The detection's box closest to ``prompt`` (1, 4) when IoU >= REFINE_IOU, else ``prompt``."""
        if len(entry.boxes) == 0:
            return prompt
        iou = box_iou(prompt, entry.boxes)[0]
        best = int(iou.argmax())  # the first of equals: the higher score
        return entry.boxes[best:best + 1] if iou[best] >= REFINE_IOU else prompt

    def _detection_at(self, entry: ImageFeatures, pixel: tuple[int, int], negatives: list[tuple[int, int]],
                      label: int | None) -> int | None:
        """Index of the best detection whose mask holds ``pixel`` and no negative: ``label``'s first, then by score."""
        order = range(len(entry.scores))  # already by score
        if label is not None:
            order = sorted(order, key=lambda i: int(entry.labels[i]) != label)  # stable: by score within
        near = [i for i in order if _near(entry.boxes[i].tolist(), pixel)]
        crops = self._detection_crops(entry, near)
        for i in near:
            crop = crops[i]
            if _holds(crop, pixel) and not any(_holds(crop, n) for n in negatives):
                return i
        return None

    def _fallback(self, entry: ImageFeatures, point: Sequence[float], pixel: tuple[int, int],
                  negatives: list[tuple[int, int]], label: int | None) -> PromptMask | None:
        """The best mask of the heads over squares centred on a click no detection answers (see :meth:`clicks`)."""
        height, width = entry.original_size
        boxes = _squares(point, width, height, self.predictor.device)
        if len(boxes) == 0:
            return None
        classes = self._class_probs(entry, boxes)[:, 1:].argmax(1) + 1 if label is None else \
            torch.full((len(boxes),), self._check_label(label), device=boxes.device)
        probs = self._mask_probs(entry, boxes, classes)
        masks = paste_masks(probs, boxes, height, width)
        scores = [_foreground_confidence(p) for p in probs]
        for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
            crop = masks.crops[i]
            if _holds(crop, pixel) and not any(_holds(crop, n) for n in negatives):
                return PromptMask(masks.dense(i), int(classes[i]), scores[i])
        return None

    def _check_label(self, label: int) -> int:
        if not 1 <= int(label) <= len(self.classes):
            raise ValueError(f"class index {label} is not one of the model's 1..{len(self.classes)} "
                             f"({', '.join(self.classes)})")
        return int(label)


def prompt_prediction(masks: Sequence[PromptMask], classes: Sequence[str], size: tuple[int, int]) -> Prediction:
    """Prompt answers as a :class:`Prediction` on a ``size`` (height, width) image, sorted by score, empty
    masks left out: what :func:`segkit.evaluation.coco.image_entry` and the Label Studio conversion take."""
    kept = sorted((m for m in masks if m.mask.any()), key=lambda m: -m.score)
    crops = [Crop.from_dense(m.mask) for m in kept]
    boxes = np.array([(c.x0, c.y0, c.x0 + c.mask.shape[1], c.y0 + c.mask.shape[0]) for c in crops],
                     dtype=np.float32).reshape(-1, 4)
    labels = np.array([m.label for m in kept], dtype=np.int64)
    return Prediction(boxes, labels, [classes[k - 1] for k in labels],
                      np.array([m.score for m in kept], dtype=np.float32), InstanceMasks(crops, *size))


def rect_to_box(value: Mapping[str, Any], width: int, height: int) -> tuple[float, float, float, float]:
    """A Label Studio rectangle's ``value`` (x, y, width, height in percent of the image; optional
    ``rotation`` in degrees, clockwise about its top-left corner) as (x0, y0, x1, y1) pixels of a
    ``width`` x ``height`` image, clamped to it. A rotated rectangle gives the box enclosing it.

    Percent means the same at any scale, so the pixels are those of the image at hand (a reduced copy
    of the original too), whatever ``original_width`` the region states.
    """
    x, y = value["x"] * width / 100, value["y"] * height / 100
    w, h = value["width"] * width / 100, value["height"] * height / 100
    angle = math.radians(value.get("rotation") or 0.0)
    cos, sin = math.cos(angle), math.sin(angle)
    # y points down, so a positive angle turns clockwise on screen, as Label Studio draws it
    xs = [x + dx * cos - dy * sin for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    ys = [y + dx * sin + dy * cos for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    return (_clamp(min(xs), width), _clamp(min(ys), height), _clamp(max(xs), width), _clamp(max(ys), height))


def keypoint_to_point(value: Mapping[str, Any], width: int, height: int) -> tuple[float, float]:
    """A Label Studio keypoint's ``value`` (x, y in percent of the image) as (x, y) pixels of a ``width`` x
    ``height`` image, clamped to [0, width] x [0, height]; the pixel it falls in is (int(x), int(y)),
    the last one for a point on the right or bottom edge."""
    return _clamp(value["x"] * width / 100, width), _clamp(value["y"] * height / 100, height)


def prompts_from_context(context: Mapping[str, Any] | None) -> list[Prompt]:
    """The prompts in Label Studio's ``params.context``: ``{"result": [region, ...]}``, each region with a
    ``type``, a ``value`` in percent and, for keypoints, ``is_positive``.

    Rectangles (``rectanglelabels``, ``rectangle``) become box prompts and keypoints (``keypointlabels``,
    ``keypoint``) clicks, labelled by the first of ``value[type]`` when there is one. A keypoint without
    ``is_positive`` is a positive click (Label Studio sends ``false`` for the negative ones; some SAM
    backends read a missing flag as negative). Other types are ignored; a malformed region raises
    ``ValueError`` naming it and its field. No context, or no ``result``: no prompts.
    """
    if context is None:
        return []
    if not isinstance(context, Mapping):
        raise ValueError(f"params.context must be an object, got {type(context).__name__}")
    results = context.get("result") or []
    if not isinstance(results, list):
        raise ValueError(f"params.context.result must be a list of regions, got {type(results).__name__}")
    prompts = []
    for i, region in enumerate(results):
        if not isinstance(region, Mapping):
            raise ValueError(f"context.result[{i}] must be an object, got {type(region).__name__}")
        kind = PROMPT_TYPES.get(region.get("type"))
        if kind is not None:
            prompts.append(_prompt(region, kind, f"context.result[{i}] ({region['type']})"))
    return prompts


def _prompt(region: Mapping[str, Any], kind: str, where: str) -> Prompt:
    value = region.get("value")
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: value must be an object, got {value!r}")
    names = ("x", "y", "width", "height") if kind == "box" else ("x", "y")
    numbers = {name: _number(value, name, where) for name in names}
    if kind == "box":
        for name in ("width", "height"):
            if numbers[name] <= 0:
                raise ValueError(f"{where}: value.{name} must be positive (percent of the image), "
                                 f"got {numbers[name]!r}")
        numbers["rotation"] = _number(value, "rotation", where) if value.get("rotation") is not None else 0.0
    positive = region.get("is_positive", True)
    if not isinstance(positive, (bool, int)) or positive not in (0, 1):
        raise ValueError(f"{where}: is_positive must be true or false, got {positive!r}")
    return Prompt(kind, numbers, _label(value, region["type"], where), bool(positive))


def _number(value: Mapping[str, Any], name: str, where: str) -> float:
    if name not in value:
        raise ValueError(f"{where}: value.{name} is missing")
    v = value[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: value.{name} must be a finite number (percent of the image), got {v!r}")
    return float(v)


def _label(value: Mapping[str, Any], region_type: str, where: str) -> str | None:
    labels = value.get(region_type) if region_type.endswith("labels") else None
    if labels is None or labels == []:
        return None
    if not isinstance(labels, list) or not isinstance(labels[0], str):
        raise ValueError(f"{where}: value.{region_type} must be a list of label names, got {labels!r}")
    return labels[0]


def _check_model(predictor: Predictor) -> None:
    """Prompts run the heads one by one: only an eager torchvision Mask R-CNN has them."""
    if getattr(predictor, "task", "instance") != "instance":
        raise ValueError(f"prompts need an instance model (Mask R-CNN); this checkpoint is a "
                         f"{predictor.task} model")
    model = getattr(predictor, "model", None)
    if model is None:
        raise ValueError("prompts need the eager model of a .pt checkpoint: an exported model "
                         f"({predictor.info.get('checkpoint', 'this one')}) runs as one graph, whose heads "
                         "cannot be run alone; serve the .pt checkpoint it was exported from")
    heads = getattr(model, "roi_heads", None)
    if heads is None or getattr(heads, "mask_predictor", None) is None:
        raise ValueError(f"prompts need a Mask R-CNN with a mask head, got {type(model).__name__}")


def _size_of(image: ImageInput) -> tuple[int, int] | None:
    """(height, width) of an in-memory image; None for a path (read only when the cache lacks it)."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    if isinstance(image, Image.Image):
        return image.height, image.width
    return None


def _clamp(v: float, top: float) -> float:
    return min(max(float(v), 0.0), float(top))


def _clamped_box(box: Sequence[float], width: int, height: int, device: torch.device) -> Tensor:
    """``box`` as a (1, 4) float tensor clamped to the image; ``ValueError`` when nothing of it is left."""
    if len(box) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((_clamp(x0, width), _clamp(x1, width)))
    y0, y1 = sorted((_clamp(y0, height), _clamp(y1, height)))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError(f"the box {tuple(box)} covers less than a pixel of the {width} x {height} image")
    return torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32, device=device)


def _cut_to_box(mask: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """``mask`` without the pixels outside ``box``: the pixels it touches stay."""
    x0, y0, x1, y1 = box
    keep = np.zeros_like(mask)
    keep[int(y0):math.ceil(y1), int(x0):math.ceil(x1)] = True
    return mask & keep


def _pixel(point: Sequence[float], width: int, height: int) -> tuple[int, int]:
    """The (column, row) of the pixel under ``point``, inside the image."""
    x, y = (float(v) for v in point)
    return min(max(int(x), 0), width - 1), min(max(int(y), 0), height - 1)


def _grown(box: Sequence[float], width: int, height: int, margin: float = ROI_MARGIN) -> tuple[float, ...]:
    """``box`` grown by ``margin`` of its sides (and a pixel) on every edge, inside the image."""
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0) + 1, margin * (y1 - y0) + 1
    return (_clamp(x0 - dx, width), _clamp(y0 - dy, height), _clamp(x1 + dx, width), _clamp(y1 + dy, height))


def _holding(roi: Sequence[float], points: Sequence[Sequence[float]], width: int, height: int) -> tuple[float, ...]:
    """``roi``, grown to hold each of ``points`` with a margin, when one lies outside it."""
    outside = [(x, y) for x, y in points if not _inside((x, y), roi, 0.0)]
    if not outside:
        return tuple(roi)
    xs, ys = [roi[0], roi[2]] + [x for x, _ in outside], [roi[1], roi[3]] + [y for _, y in outside]
    return _grown((min(xs), min(ys), max(xs), max(ys)), width, height, margin=ROI_MARGIN / 2)


def _inside(point: Sequence[float], box: Sequence[float], margin: float = ROI_MARGIN) -> bool:
    """Whether ``point`` lies in ``box`` grown by ``margin`` of its sides."""
    x, y = point
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    return x0 - dx <= x <= x1 + dx and y0 - dy <= y <= y1 + dy


def _near(box: Sequence[float], pixel: tuple[int, int]) -> bool:
    """Whether ``pixel`` may be in the mask of a detection with ``box``: a pasted mask reaches past its box
    by one mask cell (1/28 of it) and the rounding, so 10% and 2 pixels of margin are kept."""
    x0, y0, x1, y1 = box
    margin = 0.1 * max(x1 - x0, y1 - y0) + 2
    return x0 - margin <= pixel[0] <= x1 + margin and y0 - margin <= pixel[1] <= y1 + margin


def _holds(crop: Crop, pixel: tuple[int, int]) -> bool:
    x, y = pixel
    h, w = crop.mask.shape
    return crop.x0 <= x < crop.x0 + w and crop.y0 <= y < crop.y0 + h and bool(crop.mask[y - crop.y0, x - crop.x0])


def _squares(point: Sequence[float], width: int, height: int, device: torch.device) -> Tensor:
    """(n, 4) squares centred on ``point`` at :data:`FALLBACK_SCALES`, clamped to the image (empty ones dropped)."""
    x, y = (float(v) for v in point)
    boxes = []
    for scale in FALLBACK_SCALES:
        half = max(scale * min(width, height), MIN_FALLBACK_SIDE) / 2
        box = (_clamp(x - half, width), _clamp(y - half, height), _clamp(x + half, width), _clamp(y + half, height))
        if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
            boxes.append(box)
    return torch.tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4)


def _foreground_confidence(probs: Tensor) -> float:
    """Mean probability over the mask head's own foreground (cells above 0.5); 0 when it has none."""
    fg = probs[probs > 0.5]
    return float(fg.mean()) if fg.numel() else 0.0


def _class(label: int | None, detected: Tensor) -> int:
    return int(label) if label is not None else int(detected)
