"""labelme: one JSON per image with ``shapes`` in pixels and the image by ``imagePath`` or embedded.

Shapes with the same label and ``group_id`` are one object (an object split by an occluder).
Polygons, circles and labelme 5 ``mask`` shapes give masks; rectangles are boxes without a mask;
points and lines are not objects; the label ``__ignore__`` marks regions that are not objects.

An image that exists only as base64 ``imageData`` (``imagePath`` missing or not found) is written
once to ``<dataset>/.segkit_cache/<hash>.<ext>`` so that every later stage can open a plain file;
when the dataset folder is read-only the system temp folder is used instead.
"""
from __future__ import annotations

import base64
import hashlib
import io
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from segkit.atomic import atomic_write
from segkit.data.readers.files import DataError, ImageFinder, locate_image, read_json
from segkit.data.readers.shapes import Context, box_without_mask, image_record, mask_instance, polygon_instance
from segkit.data.records import DatasetRecords, Instance, Problem

IGNORE_LABEL = "__ignore__"
_MASK_SHAPES = ("polygon", "circle", "mask")


def read_labelme(path: Path, data: Any = None, images_dir: Path | None = None) -> DatasetRecords:
    """Read a folder of labelme JSON files (searched recursively), or a single labelme file."""
    root = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*.json") if not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    problems: list[Problem] = []
    finder = ImageFinder(root, images_dir)
    images, labels, n_files = [], set(), 0
    for file in files:
        try:
            doc = data if file == path and data is not None else read_json(file)
        except DataError as e:  # one broken file costs its image, not the dataset
            problems.append(Problem("invalid_annotation", str(file), f"{e}; image left out", True))
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
            continue  # some other JSON living in the folder
        n_files += 1
        ctx = Context(str(file), str(file.relative_to(root)), problems)
        found = finder.find(doc["imagePath"], file.parent) if doc.get("imagePath") else None
        if found is None and doc.get("imageData"):
            found = _cache_embedded(doc["imageData"], root)
        declared = (doc.get("imageWidth"), doc.get("imageHeight"))
        ref = doc.get("imagePath") or ""
        located = locate_image(finder, ref, file.parent, declared, file, ctx.what, problems, found)
        if located is None:
            continue
        image_path, width, height = located
        groups = _group_shapes(doc["shapes"])
        labels.update(label for label, _ in groups)
        instances = [inst for label, members in groups if (inst := _instance(label, members, width, height, file, ctx))]
        record = image_record(image_path, width, height, instances, len(groups), ctx.what, ctx)
        if record:
            record.ignore = _ignore_polygons(doc["shapes"])
            images.append(record)
    if not n_files and not problems:
        raise DataError(f"{path}: no labelme JSON files (with 'shapes') found")
    return DatasetRecords(format="labelme", source=path, images=images, classes=sorted(labels), problems=problems)


def _group_shapes(shapes: list) -> list[tuple[str, list[tuple[int, dict]]]]:
    """(label, [(shape index, shape)]) per object: shapes sharing label and group_id are merged."""
    groups: dict[Any, tuple[str, list]] = {}
    for i, s in enumerate(shapes):
        if not isinstance(s, dict) or not s.get("label") or s["label"] == IGNORE_LABEL:
            continue
        if (s.get("shape_type") or "polygon") not in (*_MASK_SHAPES, "rectangle"):
            continue  # point, line, linestrip, points: not objects
        key = (s["label"], s["group_id"]) if s.get("group_id") is not None else i
        groups.setdefault(key, (str(s["label"]), []))[1].append((i, s))
    return list(groups.values())


def _ignore_polygons(shapes: list) -> list[list[float]]:
    """The ``__ignore__`` polygons and circles as flat polygons (unreadable ones are skipped: they only ignore)."""
    polygons = []
    for s in shapes:
        if not isinstance(s, dict) or s.get("label") != IGNORE_LABEL:
            continue
        try:
            pts = [(float(x), float(y)) for x, y in s.get("points") or []]
            kind = s.get("shape_type") or "polygon"
            if kind == "polygon" and len(pts) >= 3:
                polygons.append([c for p in pts for c in p])
            elif kind == "circle":
                polygons.append(_circle(*pts[:2]))
        except (TypeError, ValueError):
            continue
    return polygons


def _instance(label: str, members: list, width: int, height: int, file: Path, ctx: Context) -> Instance | None:
    first = members[0][0]
    sctx = Context(str(file), f"{ctx.what} shape {first}", ctx.problems)
    polygons, masks, boxes = [], [], []
    try:
        for _, s in members:
            kind, pts = s.get("shape_type") or "polygon", [(float(x), float(y)) for x, y in s.get("points") or []]
            if kind == "polygon":
                polygons.append([c for p in pts for c in p])
            elif kind == "circle":
                polygons.append(_circle(*pts[:2]))
            elif kind == "mask":
                masks.append(_placed_mask(s["mask"], pts[0], width, height))
            else:
                (x0, y0), (x1, y1) = pts[:2]
                boxes.append((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        sctx.note("invalid_annotation", f"unreadable shape ({type(e).__name__}: {e}); dropped", True)
        return None
    if masks:  # mixed group: rasterise the polygons too and take the union
        if polygons:
            masks.append(mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))))
        return mask_instance(label, np.logical_or.reduce(masks), width, height, first, sctx)
    if polygons:
        return polygon_instance(label, polygons, width, height, first, sctx)
    for box in boxes:
        box_without_mask(label, box, sctx)
    return None


def _circle(center: tuple[float, float], edge: tuple[float, float], n: int = 64) -> list[float]:
    r = math.dist(center, edge)
    angles = (2 * math.pi * i / n for i in range(n))
    return [c for a in angles for c in (center[0] + r * math.cos(a), center[1] + r * math.sin(a))]


def _placed_mask(b64: str, top_left: tuple[float, float], width: int, height: int) -> np.ndarray:
    """A labelme 5 mask shape (a base64 PNG of its box) pasted into a full-image mask."""
    crop = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) > 0
    if crop.ndim == 3:
        crop = crop.any(axis=2)
    full = np.zeros((height, width), dtype=bool)
    x0, y0 = int(top_left[0]), int(top_left[1])
    h, w = min(crop.shape[0], height - y0), min(crop.shape[1], width - x0)
    if x0 >= 0 and y0 >= 0 and h > 0 and w > 0:
        full[y0:y0 + h, x0:x0 + w] = crop[:h, :w]
    return full


def _cache_embedded(image_data: str, root: Path) -> Path | None:
    """Write base64 ``imageData`` to a file named by its hash (written once, reused on every read)."""
    try:
        raw = base64.b64decode(image_data)
    except ValueError:
        return None
    ext = ".png" if raw.startswith(b"\x89PNG") else ".jpg" if raw.startswith(b"\xff\xd8") else ".img"
    name = hashlib.sha1(raw).hexdigest()[:16] + ext
    for folder in (root / ".segkit_cache", Path(tempfile.gettempdir()) / "segkit_cache"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / name
            if not target.exists():  # atomic: a concurrent reader (another DDP rank) never sees half a file
                atomic_write(target, raw)
            return target
        except OSError:
            continue
    return None
