"""Draw predictions: mask overlays, instance-id PNGs, prediction beside ground truth.

Everything works on one "id map" per image: each pixel holds the index of the instance shown there
(0 = background). Instances are sorted by score, so where masks overlap the higher-scoring instance
is the one shown, in the overlay and in the instance PNG alike. Blending and contours are whole-array
numpy operations over that map, so the cost barely grows with the number of instances.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segkit.atomic import atomic_open
from segkit.data.images import ImageInput, as_rgb, load_image
from segkit.structures.prediction import Prediction, SemanticPrediction
from segkit.data.records import ImageRecord

if TYPE_CHECKING:
    from segkit.inference.predictor import Predictor

# A fixed qualitative palette (Tableau 20, reordered so neighbours differ): class k always gets
# PALETTE[(k - 1) % 20], so a class keeps its colour across images and runs of the same model.
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
], dtype=np.uint8)


def colors_for(prediction: Prediction, color_by: Literal["class", "instance"] = "class") -> np.ndarray:
    """(N, 3) uint8 colours: one per class label (stable across images) or one per instance index."""
    keys = prediction.labels - 1 if color_by == "class" else np.arange(len(prediction))
    return PALETTE[np.asarray(keys, dtype=np.int64) % len(PALETTE)]


def instance_id_map(prediction: Prediction) -> np.ndarray:
    """(H, W) uint16 map: instance ``i`` of ``prediction`` is ``i + 1``, background 0.

    Where masks overlap, the earlier (higher-score) instance keeps the pixel: painting runs from the
    last instance to the first, so each one overwrites only lower-scoring ones.
    """
    width, height = prediction.image_size
    if len(prediction) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(prediction)} instances do not fit a 16-bit id map")
    ids = np.zeros((height, width), dtype=np.uint16)
    crops = prediction.instance_masks.crops
    for i in range(len(prediction) - 1, -1, -1):
        ids[crops[i].window][crops[i].mask] = i + 1  # only the box region: cost grows with the objects
    return ids


def instance_mask_png(prediction: Prediction) -> Image.Image:
    """The id map as an image: pixel value ``i + 1`` is instance ``i`` (score order), 0 is background.

    Mode ``L`` (8-bit) when there are at most 255 instances, else ``I;16``; overlaps go to the
    higher-score instance, as in :func:`overlay`. Save it as PNG: the ids are exact, not colours.
    """
    ids = instance_id_map(prediction)
    if len(prediction) <= 255:
        return Image.fromarray(ids.astype(np.uint8))  # mode L
    return Image.fromarray(ids)  # mode I;16


def class_map_png(prediction: SemanticPrediction) -> Image.Image:
    """A semantic prediction's class map as an 8-bit PNG image: pixel value = class index (0 background)."""
    return Image.fromarray(prediction.class_map)  # mode L


def mask_png(prediction: Prediction | SemanticPrediction) -> Image.Image:
    """What ``segkit predict`` and the demo save as masks: instance ids, or class indices for a semantic model."""
    if isinstance(prediction, SemanticPrediction):
        return class_map_png(prediction)
    return instance_mask_png(prediction)


def overlay(image: ImageInput, prediction: Prediction | SemanticPrediction, alpha: float = 0.5,
            class_filter: Iterable[str] | None = None, draw_boxes: bool = True, draw_labels: bool = True,
            color_by: Literal["class", "instance"] = "class") -> Image.Image:
    """The image (as RGB, same size) with each instance's mask filled, outlined, boxed and labelled.

    ``alpha`` is the fill opacity (0..1); ``class_filter`` keeps only instances of those class names
    (None keeps all). Labels read "class score", or just "class" when the score is NaN (ground truth).
    A :class:`SemanticPrediction` is drawn as its class map: each class filled in its colour and
    outlined, no boxes or labels (the class table says which colour is which).
    """
    image = as_rgb(image)
    if len(prediction) and prediction.image_size != image.size:
        raise ValueError(f"prediction is for a {prediction.image_size} image, not {image.size}")
    if isinstance(prediction, SemanticPrediction):
        shown = prediction if class_filter is None else prediction.keep_classes(list(class_filter))
        lut = np.zeros((256, 3), np.uint8)
        lut[1:] = PALETTE[np.arange(255) % len(PALETTE)]  # class k: PALETTE[(k - 1) % 20], as for instances
        return _blend(image, shown.class_map, lut, alpha)
    if class_filter is not None:
        wanted = set(class_filter)
        prediction = prediction.filter(np.array([name in wanted for name in prediction.class_names], dtype=bool))
    if not len(prediction):
        return image.copy()

    colors = colors_for(prediction, color_by)
    lut = np.concatenate([np.zeros((1, 3), np.uint8), colors])  # id -> colour, 0 unused
    result = _blend(image, instance_id_map(prediction), lut, alpha)
    if draw_boxes or draw_labels:
        _draw_boxes_and_labels(result, prediction, colors, draw_boxes, draw_labels)
    return result


def _blend(image: Image.Image, ids: np.ndarray, lut: np.ndarray, alpha: float) -> Image.Image:
    """``image`` with every non-zero id filled in its ``lut`` colour at opacity ``alpha`` and outlined."""
    pixels = np.asarray(image, dtype=np.uint16)
    # Integer blend over the whole image, weight 0 on background: (p * (256 - a) + c * a) >> 8.
    # Whole-array arithmetic is faster than gathering and scattering the foreground pixels.
    weight = (ids > 0).astype(np.uint16)[..., None] * np.uint16(round(float(np.clip(alpha, 0.0, 1.0)) * 256))
    out = ((pixels * (256 - weight) + np.take(lut, ids, axis=0) * weight) >> 8).astype(np.uint8)
    edges = _contours(ids, thickness=max(1, round(max(image.size) / 800)))
    out[edges] = lut[ids[edges]]
    return Image.fromarray(out)


def side_by_side(image: ImageInput, prediction: Prediction, ground_truth: Prediction,
                 alpha: float = 0.5) -> Image.Image:
    """Prediction overlay (left) beside ground truth (right), each under a caption.

    ``ground_truth`` is :meth:`Prediction.from_record` of the image's annotations (NaN scores: labels
    show the class only).
    """
    image = as_rgb(image)
    panels = [overlay(image, p, alpha) for p in (prediction, ground_truth)]
    font = _font(image.size)
    caption_h = _text_size(font, "Ag")[1] + 8
    gap = 4
    canvas = Image.new("RGB", (2 * image.width + gap, image.height + caption_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, (f"prediction ({len(prediction)})",
                                                    f"ground truth ({len(ground_truth)})"))):
        x = i * (image.width + gap)
        canvas.paste(panel, (x, caption_h))
        draw.text((x + 4, 4), title, fill="black", font=font)
    return canvas


def preview_sheet(predictor: Predictor, records: Sequence[ImageRecord], n: int = 4) -> Image.Image | None:
    """The first ``n`` images, each as prediction beside ground truth, stacked; None without images."""
    panels = []
    for record in records[:n]:
        image = load_image(record.path)
        prediction = predictor(image)
        panels.append(side_by_side(image, prediction, type(prediction).from_record(record, predictor.classes)))
    if not panels:
        return None
    sheet = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        sheet.paste(p, (0, y))
        y += p.height
    return sheet


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save ``image`` as PNG atomically (a reader never sees half a file)."""
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")
    return Path(path)


def _contours(ids: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Pixels of an instance that touch a pixel of another id (or background), grown inwards."""
    edges = np.zeros(ids.shape, dtype=bool)
    dx = ids[:, 1:] != ids[:, :-1]
    dy = ids[1:, :] != ids[:-1, :]
    edges[:, 1:] |= dx
    edges[:, :-1] |= dx
    edges[1:, :] |= dy
    edges[:-1, :] |= dy
    edges &= ids > 0
    for _ in range(thickness - 1):  # thicker lines on large images, still inside each instance
        grown = edges.copy()
        grown[:, 1:] |= edges[:, :-1]
        grown[:, :-1] |= edges[:, 1:]
        grown[1:, :] |= edges[:-1, :]
        grown[:-1, :] |= edges[1:, :]
        edges = grown & (ids > 0)
    return edges


def _font(size: tuple[int, int]) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, round(max(size) / 50)))


def _text_size(font: ImageFont.ImageFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text, anchor="lt")
    return int(right - left), int(bottom - top)


def _draw_boxes_and_labels(image: Image.Image, prediction: Prediction, colors: np.ndarray,
                           draw_boxes: bool, draw_labels: bool) -> None:
    draw = ImageDraw.Draw(image)
    font = _font(image.size)
    width = max(1, round(max(image.size) / 400))
    # Lowest score first, so the labels of the best instances end up on top.
    for i in range(len(prediction) - 1, -1, -1):
        x1, y1, x2, y2 = (float(v) for v in prediction.boxes[i])
        color = tuple(int(c) for c in colors[i])
        if draw_boxes:
            draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        if draw_labels:
            score = float(prediction.scores[i])
            text = prediction.class_names[i] if np.isnan(score) else f"{prediction.class_names[i]} {score:.2f}"
            tw, th = _text_size(font, text)
            pad = max(1, th // 5)
            ty = y1 - th - 2 * pad if y1 - th - 2 * pad >= 0 else y1  # above the box when there is room
            tx = min(max(x1, 0), max(image.width - tw - 2 * pad, 0))
            draw.rectangle((tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad), fill=color)
            # Black or white text, whichever reads better on the label colour (ITU-R BT.601 luma).
            luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
            draw.text((tx + pad, ty + pad), text, fill="black" if luma > 140 else "white", font=font, anchor="lt")
