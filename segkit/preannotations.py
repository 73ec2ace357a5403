"""Predictions as Label Studio pre-annotations: tasks whose ``predictions`` Label Studio imports.

Built from the per-image entries of :func:`segkit.coco.image_entry` (the image's path and size, its
instances as COCO annotations with RLE masks and class names), so the COCO file and the Label Studio
tasks of one run always describe the same instances.

Coordinates: COCO polygons and Label Studio polygons both put pixel ``(x, y)`` at the square
``[x, x + 1] x [y, y + 1]``, so a polygon must run along pixel *edges* to reproduce a mask; contours
through pixel centres (what ``cv2.findContours`` returns) would lose half of every boundary pixel.
"""
from __future__ import annotations

from pathlib import PurePath
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
from pycocotools import mask as mask_utils

DEFAULT_FROM_NAME = "label"  # the <PolygonLabels>/<BrushLabels> tag of the labeling config
DEFAULT_TO_NAME = "image"  # the <Image> tag


def to_labelstudio(entries: list[dict[str, Any]], model_version: str, from_name: str = DEFAULT_FROM_NAME,
                   to_name: str = DEFAULT_TO_NAME, brush: bool = False,
                   image_root_url: str | None = None) -> list[dict[str, Any]]:
    """Label Studio tasks with the predictions as pre-annotations (import them with the images' project).

    ``data.image`` is ``image_root_url + image_ref`` (URL-quoted) when a root URL is given, e.g.
    ``/data/local-files/?d=photos/`` for local-files storage, else the image path as written in the
    COCO file. Results are ``polygonlabels`` (one region per part of a mask; holes are filled, since
    Label Studio polygons have none) or, with ``brush``, lossless ``brushlabels``. The task's
    prediction score is the mean instance score, which Label Studio uses to order tasks.
    """
    tasks = []
    for entry in entries:
        ref = entry.get("image_ref") or PurePath(entry["file_name"]).name
        image = image_root_url + quote(ref) if image_root_url else entry["file_name"]
        tasks.append({"data": {"image": image},
                      "predictions": [prediction_result(entry, model_version, from_name, to_name, brush)]})
    return tasks


def prediction_result(entry: dict[str, Any], model_version: str, from_name: str = DEFAULT_FROM_NAME,
                      to_name: str = DEFAULT_TO_NAME, brush: bool = False,
                      labels: dict[str, str] | None = None) -> dict[str, Any]:
    """One image's predictions as one Label Studio prediction: ``{model_version, score, result}``.

    ``labels`` maps class names to the labeling config's label values; instances of classes it
    lacks are left out (Label Studio would store them but draw nothing). The score is the mean
    instance score of what is sent, which Label Studio uses to order tasks.
    """
    kept = [(k, ann) for k, ann in enumerate(entry["annotations"]) if labels is None or ann["label"] in labels]
    result = [item for k, ann in kept
              for item in _regions(k, ann, entry["width"], entry["height"], from_name, to_name, brush,
                                   ann["label"] if labels is None else labels[ann["label"]])]
    scores = [ann["score"] for _, ann in kept]
    return {"model_version": model_version, "score": float(np.mean(scores)) if scores else 0.0, "result": result}


def _regions(k: int, ann: dict[str, Any], w: int, h: int, from_name: str, to_name: str,
             brush: bool, label: str) -> list[dict[str, Any]]:
    """Label Studio result items of the ``k``-th instance: one brush, or one polygon per part."""
    mask = mask_utils.decode(ann["segmentation"]).astype(bool)
    common = {"from_name": from_name, "to_name": to_name, "original_width": w, "original_height": h,
              "image_rotation": 0, "score": ann["score"]}
    if brush:
        return [{"id": _region_id(k), "type": "brushlabels", **common,
                 "value": {"format": "rle", "rle": mask_to_ls_rle(mask), "brushlabels": [label]}}]
    return [{"id": _region_id(k, j), "type": "polygonlabels", **common,
             "value": {"points": [[100.0 * x / w, 100.0 * y / h] for x, y in zip(poly[0::2], poly[1::2])],
                       "closed": True, "polygonlabels": [label]}}
            for j, poly in enumerate(mask_to_polygons(mask))]


def _region_id(instance: int, part: int = 0) -> str:
    # Unique within a task and the same on every run; the parts of one mask share their instance number.
    return f"i{instance}" + (f"p{part}" if part else "")


def mask_to_ls_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a boolean (H, W) mask (RGBA with 255 where the mask is)."""
    # Imported here: the converter package pulls in nltk and pandas (seconds) for its other exports.
    from label_studio_converter.brush import mask2rle

    return mask2rle(np.asarray(mask, dtype=np.uint8) * 255)


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.5, min_part: float = 0.05) -> list[list[float]]:
    """Outer contours of a boolean mask as flat ``[x0, y0, x1, y1, ...]`` pixel-edge polygons, largest first.

    Parts smaller than ``min_part`` of the largest part are dropped as specks; points are simplified
    by ``tolerance`` pixels (Douglas-Peucker), which keeps regions editable in Label Studio.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    x0, y0 = int(xs.min()), int(ys.min())
    crop = np.asarray(mask[y0:ys.max() + 1, x0:xs.max() + 1], dtype=np.uint8)
    # Doubling the pixels puts boundary-pixel centres a quarter pixel from the true edge; mapping
    # (c + 0.5) / 2 then lands exactly on the edges, which is what polygon rasterisation expects.
    up = np.pad(np.kron(crop, np.ones((2, 2), np.uint8)), 1)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    parts = sorted(((cv2.contourArea(c), c) for c in contours), key=lambda ac: -ac[0])
    polygons = []
    for area, contour in parts:
        if area < min_part * parts[0][0]:
            break
        simple = cv2.approxPolyDP(contour, 2 * tolerance, True)
        contour = (simple if len(simple) >= 3 else contour).reshape(-1, 2).astype(np.float64)  # tiny parts: keep all
        xy = (contour - 1 + 0.5) / 2 + (x0, y0)  # -1 undoes the padding
        polygons.append([round(float(v), 2) for v in xy.ravel()])
    return polygons
