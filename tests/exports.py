"""Small fake exports written into a test's tmp_path, shaped like the real tools write them."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
LS_FIXTURES = SHARED / "realdata" / "labelstudio_sdk_fixtures" / "tests" / "custom" / "converter"
DESKS = SHARED / "realdata" / "labelstudio_coco_desks"

RED = (255, 0, 0)


def write_image(path: Path, size: tuple[int, int] = (64, 48), color=(40, 80, 120), fmt: str = "PNG",
                box: tuple[int, int, int, int] | None = None, box_color=RED, orientation: int | None = None) -> Path:
    """An image of ``size`` (as stored, before EXIF) with an optional filled ``box`` (x0, y0, x1, y1)."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = color
    if box:
        a[box[1]:box[3], box[0]:box[2]] = box_color
    im = Image.fromarray(a)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"quality": 95} if fmt == "JPEG" else {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    im.save(path, format=fmt, **kwargs)
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def square(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """A flat COCO polygon of an axis-aligned rectangle."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# --- COCO / Label Studio COCO -------------------------------------------------------------------

def coco_export(folder: Path, images: list[dict], annotations: list[dict], categories: list[dict],
                label_studio: bool = True, name: str = "result.json") -> Path:
    """Write ``folder/name``; Label Studio signs its export in ``info.contributor``."""
    info = {"contributor": "Label Studio", "year": 2024} if label_studio else {"description": "test"}
    return write_json(folder / name, {"images": images, "annotations": annotations, "categories": categories, "info": info})


def coco_ann(ann_id: int, image_id: int, category_id: int, segmentation: Any, bbox=None, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "bbox": bbox or [0, 0, 1, 1], "iscrowd": iscrowd, "area": 1}


# --- Label Studio JSON --------------------------------------------------------------------------

def ls_task(task_id: int, image: str, annotations: list[dict]) -> dict:
    return {"id": task_id, "data": {"image": image}, "annotations": annotations, "predictions": []}


def ls_annotation(ann_id: int, results: list[dict], updated_at: str = "2024-01-01T10:00:00.000000Z",
                  was_cancelled: bool = False) -> dict:
    return {"id": ann_id, "result": results, "was_cancelled": was_cancelled,
            "created_at": updated_at, "updated_at": updated_at}


def ls_polygon(region_id: str, label: str, points_pct: list[list[float]], width: int, height: int) -> dict:
    return {"id": region_id, "type": "polygonlabels", "from_name": "label", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"points": points_pct, "polygonlabels": [label], "closed": True}}


def ls_rectangle(region_id: str, label: str, x: float, y: float, w: float, h: float, width: int, height: int,
                 rotation: float = 0) -> dict:
    return {"id": region_id, "type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]}}


def ls_brush(region_id: str, label: str, mask: np.ndarray) -> dict:
    """A brush region encoded with Label Studio's own encoder, as the web UI stores it."""
    from label_studio_converter.brush import mask2rle

    height, width = mask.shape
    return {"id": region_id, "type": "brushlabels", "from_name": "label", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle((mask > 0).astype(np.uint8) * 255), "brushlabels": [label]}}


# --- labelme ------------------------------------------------------------------------------------

def labelme_shape(label: str, points: list[list[float]], shape_type: str = "polygon", group_id: int | None = None) -> dict:
    return {"label": label, "points": points, "group_id": group_id, "shape_type": shape_type, "flags": {}}


def labelme_file(path: Path, shapes: list[dict], image_path: str | None, size: tuple[int, int],
                 image_data: bytes | None = None) -> Path:
    return write_json(path, {
        "version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
        "imageData": base64.b64encode(image_data).decode() if image_data else None,
        "imageWidth": size[0], "imageHeight": size[1],
    })


def png_bytes(size: tuple[int, int] = (32, 24), color=(0, 200, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()
