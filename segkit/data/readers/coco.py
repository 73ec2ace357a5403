"""COCO instances JSON, including Label Studio's COCO export (``result.json`` + ``images/``).

Label Studio numbers categories from 0 in alphabetical order and writes rectangles as
``"segmentation": []``; other tools use any category ids, RLE masks (compressed or not) and
``iscrowd``. Category ids are mapped to names here, so the label order downstream is ours.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from segkit.data.readers.files import DataError, ImageFinder, locate_image, read_json
from segkit.data.readers.shapes import Context, box_without_mask, image_record, polygon_instance, rle_instance
from segkit.data.records import DatasetRecords, Instance, Problem


def is_label_studio(data: dict) -> bool:
    """Label Studio signs its COCO export in ``info.contributor``."""
    info = data.get("info")
    return isinstance(info, dict) and info.get("contributor") == "Label Studio"


def read_coco(path: Path, data: Any = None, images_dir: Path | None = None) -> DatasetRecords:
    """Read a COCO instances file; images are looked up relative to it, then by name under its folder."""
    data = read_json(path) if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO file (no 'images' list)")
    if not data["images"]:
        raise DataError(f"{path}: the export lists no images")
    problems: list[Problem] = []
    names = _category_names(data.get("categories"), path, problems)
    anns_by_image = _annotations_by_image(data.get("annotations"), path, problems)
    finder = ImageFinder(path.parent, images_dir)
    images, seen = [], set()
    for entry in data["images"]:
        if not isinstance(entry, dict) or "id" not in entry:
            ctx = Context(str(path), f"image entry {str(entry)[:80]}", problems)
            ctx.note("invalid_annotation", "no id; skipped", True)
            continue
        image_id = entry["id"]
        file_name = str(entry.get("file_name") or "")
        ctx = Context(str(path), f"image {image_id} ({file_name})", problems)
        if image_id in seen:
            ctx.note("duplicate_id", "image id listed twice; the second entry is skipped", True)
            continue
        seen.add(image_id)
        anns = anns_by_image.pop(image_id, [])
        declared = (entry.get("width"), entry.get("height"))
        found = locate_image(finder, file_name, path.parent, declared, path, ctx.what, problems)
        if found is None:
            continue
        image_path, width, height = found
        instances = [inst for ann in anns if (inst := _instance(ann, names, width, height, path, problems))]
        record = image_record(image_path, width, height, instances, len(anns), image_id, ctx)
        if record:
            images.append(record)
    for image_id, anns in anns_by_image.items():
        ids = ", ".join(str(a.get("id")) for a in anns[:5])
        ctx = Context(str(path), f"annotations {ids}", problems)
        ctx.note("invalid_annotation", f"image_id {image_id!r} is not in images; dropped", True)
    fmt = "labelstudio-coco" if is_label_studio(data) else "coco"
    classes = list(dict.fromkeys(names[k] for k in sorted(names, key=_id_order)))
    return DatasetRecords(format=fmt, source=path, images=images, classes=classes, problems=problems)


def _category_names(categories: Any, path: Path, problems: list[Problem]) -> dict[Any, str]:
    names: dict[Any, str] = {}
    for cat in categories or []:
        if not isinstance(cat, dict) or "id" not in cat:
            Context(str(path), f"category {str(cat)[:80]}", problems).note("invalid_annotation", "no id; skipped")
            continue
        if cat["id"] in names:
            ctx = Context(str(path), f"category {cat['id']}", problems)
            ctx.note("duplicate_id", "id listed twice; the first name is kept")
            continue
        names[cat["id"]] = str(cat.get("name", cat["id"]))
    return names


def _annotations_by_image(annotations: Any, path: Path, problems: list[Problem]) -> dict[Any, list[dict]]:
    by_image: dict[Any, list[dict]] = defaultdict(list)
    seen: set = set()
    for ann in annotations or []:
        if not isinstance(ann, dict) or "image_id" not in ann:
            ctx = Context(str(path), f"annotation {str(ann)[:80]}", problems)
            ctx.note("invalid_annotation", "no image_id; dropped", True)
            continue
        if ann.get("id") is not None:
            if ann["id"] in seen:
                ctx = Context(str(path), f"annotation {ann['id']} (image {ann['image_id']})", problems)
                ctx.note("duplicate_id", "id used twice; both kept")
            seen.add(ann["id"])
        by_image[ann["image_id"]].append(ann)
    return by_image


def _instance(ann: dict, names: dict, width: int, height: int, path: Path, problems: list[Problem]) -> Instance | None:
    ctx = Context(str(path), f"annotation {ann.get('id')} (image {ann['image_id']})", problems)
    cid = ann.get("category_id")
    if cid not in names:
        ctx.note("unknown_class", f"category_id {cid!r} is not in categories; dropped", True)
        return None
    label, seg, crowd = names[cid], ann.get("segmentation"), bool(ann.get("iscrowd", 0))
    try:
        if isinstance(seg, dict):
            return rle_instance(label, seg, width, height, ann.get("id"), ctx, crowd)
        if isinstance(seg, list) and seg:
            polygons = [seg] if all(isinstance(v, (int, float)) for v in seg) else seg  # a bare flat polygon
            return polygon_instance(label, polygons, width, height, ann.get("id"), ctx, crowd)
        x, y, w, h = (float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError) as e:
        ctx.note("invalid_annotation", f"neither a mask nor a box ({type(e).__name__}: {e}); dropped", True)
        return None
    box_without_mask(label, (x, y, x + w, y + h), ctx)
    return None


def _id_order(cid: Any) -> tuple:
    # Ids are usually ints but some tools write strings; never compare int with str.
    return (0, cid, "") if isinstance(cid, (int, float)) else (1, 0, str(cid))
