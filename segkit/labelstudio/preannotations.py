"""Predictions as Label Studio pre-annotations: tasks whose ``predictions`` Label Studio imports.

Built from the per-image entries of :func:`segkit.evaluation.coco.image_entry` (the image's path and size, its
instances as COCO annotations with RLE masks and class names), so the COCO file and the Label Studio
tasks of one run always describe the same instances.

Coordinates: COCO polygons and Label Studio polygons both put pixel ``(x, y)`` at the square
``[x, x + 1] x [y, y + 1]``, so a polygon must run along pixel *edges* to reproduce a mask; contours
through pixel centres (what ``cv2.findContours`` returns) would lose half of every boundary pixel.

A prediction made on a reduced copy of a large photo (:func:`segkit.data.images.load_scaled`) is stated at
the original's size with ``original_size``: polygons are in percent, the same at any scale; brushes are
encoded at the original size, each mask enlarged alone and only over its bounding box.
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
                      labels: dict[str, str] | None = None,
                      original_size: tuple[int, int] | None = None, score: float | None = None) -> dict[str, Any]:
    """One image's predictions as one Label Studio prediction: ``{model_version, score, result}``.

    ``labels`` maps class names to the labeling config's label values; instances of classes it
    lacks are left out (Label Studio would store them but draw nothing). ``score``, which Label Studio
    orders tasks by, defaults to the mean instance score of what is sent (see
    :func:`segkit.serve.prelabel.task_score` for the one that puts the least-sure first). ``original_size`` is the
    (width, height) of the image the regions are for when ``entry`` was predicted on a reduced copy
    of it; brush masks are then enlarged to it by nearest neighbour. None: the entry's own size.
    """
    size = original_size or (entry["width"], entry["height"])
    kept = [(k, ann) for k, ann in enumerate(entry["annotations"]) if labels is None or ann["label"] in labels]
    result = [item for k, ann in kept
              for item in _regions(k, ann, size, from_name, to_name, brush,
                                   ann["label"] if labels is None else labels[ann["label"]])]
    scores = [ann["score"] for _, ann in kept]
    if score is None:
        score = float(np.mean(scores)) if scores else 0.0
    return {"model_version": model_version, "score": float(score), "result": result}


def _regions(k: int, ann: dict[str, Any], size: tuple[int, int], from_name: str, to_name: str,
             brush: bool, label: str) -> list[dict[str, Any]]:
    """Label Studio result items of the ``k``-th instance on a ``size`` image: one brush, or one polygon per part."""
    mask = mask_utils.decode(ann["segmentation"]).astype(bool)
    h, w = mask.shape  # the predicted image's size; percentages hold at the original's
    common = {"from_name": from_name, "to_name": to_name, "original_width": int(size[0]),
              "original_height": int(size[1]), "image_rotation": 0, "score": ann["score"]}
    if brush:
        return [{"id": _region_id(k), "type": "brushlabels", **common,
                 "value": {"format": "rle", "rle": mask_to_ls_rle(mask, size), "brushlabels": [label]}}]
    return [{"id": _region_id(k, j), "type": "polygonlabels", **common,
             "value": {"points": [[100.0 * x / w, 100.0 * y / h] for x, y in zip(poly[0::2], poly[1::2])],
                       "closed": True, "polygonlabels": [label]}}
            for j, poly in enumerate(mask_to_polygons(mask))]


def _region_id(instance: int, part: int = 0) -> str:
    # Unique within a task and the same on every run; the parts of one mask share their instance number.
    return f"i{instance}" + (f"p{part}" if part else "")


def mask_to_ls_rle(mask: np.ndarray, size: tuple[int, int] | None = None) -> list[int]:
    """Label Studio brush RLE of a boolean (H, W) mask (RGBA with 255 where the mask is).

    ``size`` (width, height) encodes the mask enlarged to that size by nearest neighbour, sampled at
    pixel centres like Pillow's NEAREST (which may pick the other pixel when a centre falls exactly on
    an edge); None: its own size. The bytes are those of ``label_studio_converter.brush.mask2rle``,
    made from the mask's runs: no full-size 4-channel copy, and only the mask's bounding box is enlarged.
    """
    mask = np.asarray(mask, dtype=bool)
    width, height = size or (mask.shape[1], mask.shape[0])
    x0, y0, box = _enlarged_box(mask, width, height)
    lengths, values = _row_major_runs(box, x0, y0, width, height)
    return _ls_rle(lengths * 4, values, 4 * width * height)  # 4 equal channels: every run is 4 times longer


def _enlarged_box(mask: np.ndarray, width: int, height: int) -> tuple[int, int, np.ndarray]:
    """(x0, y0, box): the part of ``mask`` enlarged to (width, height) that holds all of it."""
    rows, cols = _nearest_source(mask.shape[0], height), _nearest_source(mask.shape[1], width)
    ys, xs = np.flatnonzero(mask.any(axis=1)[rows]), np.flatnonzero(mask.any(axis=0)[cols])
    if len(ys) == 0:
        return 0, 0, np.zeros((0, 0), dtype=bool)
    return int(xs[0]), int(ys[0]), mask[np.ix_(rows[ys[0]:ys[-1] + 1], cols[xs[0]:xs[-1] + 1])]


def _nearest_source(n_in: int, n_out: int) -> np.ndarray:
    """For each of ``n_out`` pixels along an axis, the one of ``n_in`` under its centre (the later on a tie)."""
    return (2 * np.arange(n_out, dtype=np.int64) + 1) * n_in // (2 * n_out)  # in integers: ties are exact


def _row_major_runs(box: np.ndarray, x0: int, y0: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, values 0/255) of the runs of the whole (height, width) image, row by row, with ``box`` at (x0, y0)."""
    padded = np.zeros((box.shape[0], box.shape[1] + 2), dtype=np.int8)  # a zero column each side:
    padded[:, 1:-1] = box  # every run then starts and ends inside its row
    rows, cols = np.nonzero(np.diff(padded, axis=1))  # row-major: start, end, start, end...
    edges = (rows.astype(np.int64) + y0) * width + (cols.astype(np.int64) + x0)
    starts, ends = edges[0::2], edges[1::2]
    joined = starts[1:] == ends[:-1]  # a run that goes on at the start of the next row
    starts = np.concatenate([starts[:1], starts[1:][~joined]])
    ends = np.concatenate([ends[:-1][~joined], ends[-1:]])
    bounds = np.concatenate([[0], np.stack([starts, ends], axis=1).ravel(), [width * height]])
    lengths = np.diff(bounds)
    values = np.resize(np.array([0, 255]), len(lengths))  # background first, then alternating
    return lengths[lengths > 0], values[lengths > 0]  # only the first and last can be empty


def _ls_rle(lengths: np.ndarray, values: np.ndarray, total: int) -> list[int]:
    """Label Studio's RLE bytes of runs: a header (value count, word size 8, run-size classes 3/4/8/16
    bits), then per run a flag, a class, its length - 1 and the value, as ``mask2rle`` writes them."""
    bits = [f"{total:032b}{8 - 1:05b}" + "".join(f"{n - 1:04b}" for n in (3, 4, 8, 16))]
    bits += [_run_bits(int(n), int(v)) for n, v in zip(lengths, values)]
    text = "".join(bits)
    text += "0" * (8 - len(text) % 8)  # as mask2rle pads: a whole zero byte when already aligned
    return np.packbits(np.frombuffer(text.encode("ascii"), dtype=np.uint8) - ord("0")).tolist()


def _run_bits(n: int, value: int) -> str:
    v = f"{value:08b}"
    if n == 1:
        return f"000000{v}"  # flag 0 (values follow one by one), class 0, 0 more: one value
    if n <= 8:
        return f"100{n - 1:03b}{v}"
    if n <= 16:
        return f"101{n - 1:04b}{v}"
    if n <= 256:
        return f"110{n - 1:08b}{v}"
    chunks = (n - 1) // 65536  # a run over 2^16 is written as 2^16-long runs and the rest
    return f"111{65535:016b}{v}" * chunks + f"111{n - 1 - chunks * 65536:016b}{v}"


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
