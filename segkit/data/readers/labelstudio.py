"""Label Studio JSON export: a list of tasks, each with ``data`` (the image) and ``annotations``.

Regions are in percent of the image: polygons (``points``), brushes (Label Studio's own RLE of an
RGBA canvas, decoded with ``label_studio_converter``), ellipses, and rectangles (rotated about
their top-left corner). Of several annotations per task the newest submitted one is used.
"""
from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from segkit.data.images import IMAGE_EXTENSIONS
from segkit.data.readers.files import DataError, ImageFinder, locate_image, read_json
from segkit.data.readers.shapes import Context, box_without_mask, image_record, mask_instance, polygon_instance
from segkit.data.records import DatasetRecords, Instance, Problem

_REGIONS = ("polygon", "brush", "rectangle", "ellipse")  # types that outline an object


def read_labelstudio(path: Path, data: Any = None, images_dir: Path | None = None) -> DatasetRecords:
    """Read a Label Studio JSON export (``[{"data": {...}, "annotations": [...]}, ...]``)."""
    tasks = read_json(path) if data is None else data
    if isinstance(tasks, dict) and "data" in tasks:  # a single task saved on its own
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise DataError(f"{path}: not a Label Studio JSON export (expected a list of tasks)")
    if not tasks:
        raise DataError(f"{path}: the export has no tasks")
    problems: list[Problem] = []
    finder = ImageFinder(path.parent, images_dir)
    images, labels, seen = [], set(), set()
    for task in tasks:
        if not isinstance(task, dict):
            ctx = Context(str(path), f"task {str(task)[:60]}", problems)
            ctx.note("invalid_annotation", "not an object; skipped", True)
            continue
        ctx = Context(str(path), f"task {task.get('id')}", problems)
        if task.get("id") is not None and task["id"] in seen:
            ctx.note("duplicate_id", "task id listed twice; both kept")
        seen.add(task.get("id"))
        ann = _pick_annotation(task, ctx)
        if ann is None:
            continue
        results = ann.get("result") if isinstance(ann.get("result"), list) else []
        regions = _regions(results)
        labels.update(label for r, label in regions if label)
        ref = image_reference(task.get("data"))
        found = locate_image(finder, ref or "", path.parent, _declared_size(results), path, ctx.what, problems)
        if found is None:
            continue
        image_path, width, height = found
        instances = []
        for r, label in regions:
            what = f"task {task.get('id')}, annotation {ann.get('id')}, region {r.get('id')}"
            rctx = Context(str(path), what, problems)
            if inst := _instance(r, label, width, height, rctx):
                instances.append(inst)
        record = image_record(image_path, width, height, instances, len(regions), task.get("id"), ctx)
        if record:
            images.append(record)
    return DatasetRecords("labelstudio-json", source=path, images=images, classes=sorted(labels), problems=problems)


def _pick_annotation(task: dict, ctx: Context) -> dict | None:
    """The newest annotation that was not cancelled (skipped); notes when there was a choice."""
    anns = [a for a in task.get("annotations") or [] if isinstance(a, dict)]
    usable = [a for a in anns if not a.get("was_cancelled")]
    if not usable:
        why = f"all {len(anns)} annotations were cancelled (skipped)" if anns else "not annotated"
        ctx.note("unlabeled_task", f"{why}; left out", True)
        return None
    best = max(usable, key=lambda a: (_time(a.get("updated_at")), _time(a.get("created_at")), _number(a.get("id"))))
    if len(usable) > 1:
        ctx.note("multiple_annotations", f"{len(usable)} annotations; used annotation {best.get('id')} (the newest)")
    return best


def _regions(results: list) -> list[tuple[dict, str | None]]:
    """(result, label) for each region; a separate Labels tag gives its label to the region of the same id."""
    side_labels = {
        r.get("id"): r["value"]["labels"][0]
        for r in results
        if isinstance(r, dict) and r.get("type") == "labels" and (r.get("value") or {}).get("labels")
    }
    out = []
    for r in results:
        if not isinstance(r, dict) or not isinstance(r.get("value"), dict):
            continue
        kind = str(r.get("type", "")).lower().removesuffix("labels")
        if kind not in _REGIONS:
            continue  # keypoints, choices, text: not objects
        names = r["value"].get(kind + "labels") or r["value"].get("labels")
        out.append((r, names[0] if names else side_labels.get(r.get("id"))))
    return out


def _instance(r: dict, label: str | None, width: int, height: int, ctx: Context) -> Instance | None:
    kind, v = str(r["type"]).lower().removesuffix("labels"), r["value"]
    if not label:
        ctx.note("invalid_annotation", f"{kind} without a label; dropped", True)
        return None
    try:
        if kind == "polygon":
            flat = [c for x, y in v["points"] for c in (float(x) * width / 100, float(y) * height / 100)]
            return polygon_instance(label, [flat], width, height, r.get("id"), ctx)
        if kind == "brush":
            return mask_instance(label, _brush_mask(r), width, height, r.get("id"), ctx)
        if kind == "ellipse":
            return polygon_instance(label, [_ellipse(v, width, height)], width, height, r.get("id"), ctx)
        corners = _rectangle(v, width, height)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        ctx.note("invalid_annotation", f"unreadable {kind} ({type(e).__name__}: {e}); dropped", True)
        return None
    xs, ys = corners[0::2], corners[1::2]
    box_without_mask(label, (min(xs), min(ys), max(xs), max(ys)), ctx)
    return None


def _brush_mask(r: dict) -> np.ndarray:
    """Label Studio brush RLE -> (H, W) bool mask at the size the annotator saw."""
    # Imported here: the converter package pulls in nltk and pandas (1.5 s) for its other exports.
    from label_studio_converter.brush import decode_rle

    v = r["value"]
    rle = v.get("rle") or r.get("rle")  # older exports keep it beside "value"
    w, h = int(r["original_width"]), int(r["original_height"])
    flat = decode_rle(rle)  # RGBA canvas; the alpha channel is the brush
    if flat.size != w * h * 4:
        raise ValueError(f"brush RLE has {flat.size} values, expected {w}x{h}x4")
    return flat.reshape(h, w, 4)[:, :, 3] > 0


def _rectangle(v: dict, width: int, height: int) -> list[float]:
    """Corners of a (possibly rotated) rectangle in pixels; Label Studio rotates about the top-left corner."""
    x, y = float(v["x"]) * width / 100, float(v["y"]) * height / 100
    w, h = float(v["width"]) * width / 100, float(v["height"]) * height / 100
    a = math.radians(float(v.get("rotation") or 0))
    cos, sin = math.cos(a), math.sin(a)
    corners = ((0, 0), (w, 0), (w, h), (0, h))
    return [c for dx, dy in corners for c in (x + dx * cos - dy * sin, y + dx * sin + dy * cos)]


def _ellipse(v: dict, width: int, height: int, n: int = 64) -> list[float]:
    cx, cy = float(v["x"]) * width / 100, float(v["y"]) * height / 100
    rx, ry = float(v["radiusX"]) * width / 100, float(v["radiusY"]) * height / 100
    a = math.radians(float(v.get("rotation") or 0))
    out = []
    for i in range(n):
        t = 2 * math.pi * i / n
        dx, dy = rx * math.cos(t), ry * math.sin(t)
        out += [cx + dx * math.cos(a) - dy * math.sin(a), cy + dx * math.sin(a) + dy * math.cos(a)]
    return out


def image_reference(data: Any) -> str | None:
    """The first value of a task's ``data`` that looks like an image path or URL, else ``data["image"]``."""
    if not isinstance(data, dict):
        return None
    values = [v for v in data.values() if isinstance(v, str)]
    for v in values:
        parsed = urlparse(v)
        name = parse_qs(parsed.query).get("d", [parsed.path])[0]
        if PurePosixPath(name.replace("\\", "/")).suffix.lower() in IMAGE_EXTENSIONS:
            return v
    image = data.get("image")
    return image if isinstance(image, str) else None


def _declared_size(results: list) -> tuple[int, int] | None:
    for r in results:
        if isinstance(r, dict) and r.get("original_width") and r.get("original_height"):
            return int(r["original_width"]), int(r["original_height"])
    return None


def _time(value: Any) -> float:
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return float("-inf")


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("-inf")
