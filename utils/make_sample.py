"""Generate the embedded sample dataset: synthetic leaves, pebbles and shells, exported as Label Studio does.

    python utils/make_sample.py [--out data/sample] [--seed 0]

Everything comes from seeded numpy generators, so a re-run writes byte-identical files. Objects are
drawn one after the other; a later object occludes an earlier one, and the ground truth of the
earlier one is only its visible part. A placement is rejected (and retried) when it would leave an
earlier object less than 30% visible, split it in pieces or punch a hole in it: every visible
object then has exactly one outline, which a Label Studio polygon can hold.

Each split is written the way Label Studio writes its two exports:
    <split>/images/<8hex>-img_0001.jpg   uploaded files keep Label Studio's hash prefix
    <split>/result.json                  "COCO" export (0-based ids, categories sorted by name)
    <split>/tasks.json                   "JSON" export: tasks with polygonlabels and brushlabels
About one instance in five is a brush (Label Studio RLE) in tasks.json. Label Studio's own COCO
export skips brush results; result.json keeps them as the traced polygon instead, so that both files
describe the same objects.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
from label_studio_converter.brush import mask2rle
from PIL import Image
from pycocotools import mask as mask_utils

CLASSES = ("leaf", "pebble", "shell")
SPLITS = (("train", 80), ("val", 20))  # the first 80 generated images are train, the rest val
EMPTY = {5, 38, 71, 90}  # image indices without objects: three train negatives, one val
MIN_VISIBLE = 0.3  # an earlier object must keep this fraction of its pixels visible
MIN_PIXELS = 300  # smaller visible parts are not worth annotating
BRUSH_RATE = 0.2  # fraction of instances exported as brushes in tasks.json
JPEG_QUALITY = 90
POLY_IOU = 0.95  # an instance's polygon must reproduce its mask at least this well
_UPSAMPLE = 4  # contours are traced on a 4x upsampled mask so that they follow pixel edges
_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"

Sample = tuple[str, np.ndarray, list[tuple[str, np.ndarray]]]


# ---- drawing ---------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 1) -> np.ndarray:
    """Noise in [-1, 1] that varies over about ``cells`` blobs across the image (cubic upsampling)."""
    gh, gw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    grid = rng.uniform(-1, 1, (gh, gw, channels)).astype(np.float32)
    out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(out.reshape(h, w, channels), -1, 1)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A table-top like float image: a muted base colour, a lighting gradient and soft blotches."""
    base = rng.uniform(70, 190) + rng.uniform(-25, 25, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None] * rng.uniform(20, 50)
    cells = rng.integers(3, 7)
    # blotches mostly of lightness, a little of hue
    blotches = _smooth_noise(rng, h, w, cells) * 22 + _smooth_noise(rng, h, w, cells, 3) * 8
    blotches = blotches + _smooth_noise(rng, h, w, 24) * 8  # finer mottling
    return base + ramp + blotches


def _leaf_outline(rng: np.random.Generator, size: float) -> np.ndarray:
    """A lens with two pointed tips, slightly bent and asymmetric, in local coordinates."""
    t = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    width = size * rng.uniform(0.3, 0.5)
    x = size * np.cos(t)
    y = width * np.sign(np.sin(t)) * np.abs(np.sin(t)) ** 1.4 * (1 + 0.25 * np.cos(t) * rng.uniform(-1, 1))
    y = y + rng.uniform(-0.25, 0.25) * size * (x / size) ** 2  # bend along the midrib
    return np.stack([x, y], 1)


def _pebble_outline(rng: np.random.Generator, size: float) -> np.ndarray:
    """A squashed ellipse whose radius wobbles with a few low harmonics: round, no corners."""
    t = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 5):
        r += rng.uniform(0, 0.24 / k) * np.cos(k * t + rng.uniform(0, 2 * np.pi))  # gentler at higher k
    aspect = rng.uniform(0.55, 0.9)
    return np.stack([size * 0.8 * r * np.cos(t), size * 0.8 * aspect * r * np.sin(t)], 1)


def _shell_outline(rng: np.random.Generator, size: float) -> np.ndarray:
    """A scallop: a fan with a ribbed (wavy) rim and two hinge "ears" at its apex (the origin)."""
    spread = rng.uniform(0.3, 0.42) * np.pi
    ribs = int(rng.integers(7, 12))
    a = np.linspace(-spread, spread, 120)
    r = size * (1.1 + 0.07 * np.abs(np.sin(ribs * (a + spread) / (2 * spread) * np.pi)))
    rim = np.stack([r * np.sin(a), -r * np.cos(a)], 1)
    ears = size * np.array([[0.12, -0.08], [0.3, -0.1], [0.3, 0.12], [-0.3, 0.12], [-0.3, -0.1], [-0.12, -0.08]])
    return np.concatenate([rim, ears])


_OUTLINES = {"leaf": _leaf_outline, "pebble": _pebble_outline, "shell": _shell_outline}


def _place(rng: np.random.Generator, outline: np.ndarray, h: int, w: int) -> np.ndarray:
    """Rotate and move a local outline to a random spot; (K, 2) float pixel coordinates."""
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h])
    return outline @ rot.T + centre


def _fill(points: np.ndarray, h: int, w: int) -> np.ndarray:
    """Rasterise a polygon with 1/8 px vertex precision into a uint8 {0, 1} mask."""
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(points * 8).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=3)
    return mask


def _paint(rng: np.random.Generator, image: np.ndarray, cls: str, mask: np.ndarray, points: np.ndarray) -> None:
    """Paint one object over ``image`` (float HxWx3) inside ``mask``, with texture and shading."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    bh, bw = y1 - y0, x1 - x0
    yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float32)
    light = 1 + 0.25 * ((bw - xx) / bw + (bh - yy) / bh - 1)  # lit from the top left
    if cls == "leaf":
        autumn = rng.random() < 0.3
        colour = rng.uniform([150, 110, 20], [210, 160, 50]) if autumn else rng.uniform([40, 100, 20], [110, 180, 70])
        texture = 1 + 0.12 * _smooth_noise(rng, bh, bw, 6)[..., 0]
        # a darker midrib along the leaf's long axis: the line between its two tips
        tips = points[[0, len(points) // 2]] - [x0, y0]
        rib = np.zeros((bh, bw), np.float32)
        cv2.line(rib, tuple(np.round(tips[0]).astype(int)), tuple(np.round(tips[1]).astype(int)), 1.0, 2)
        texture = texture * (1 - 0.35 * cv2.GaussianBlur(rib, (5, 5), 1))
    elif cls == "pebble":
        colour = rng.uniform(95, 185) + rng.uniform([-5, -10, -25], [25, 10, 5])
        texture = 1 + 0.10 * _smooth_noise(rng, bh, bw, 10)[..., 0] + 0.06 * _smooth_noise(rng, bh, bw, 30)[..., 0]
        light = light ** 1.6  # rounder: stronger shading
    else:
        colour = rng.uniform([200, 140, 110], [250, 200, 170])
        # radial ribs fanning out from the hinge (the ears are the outline's last points)
        hinge = points[-5:-1].mean(0) - [x0, y0]
        theta = np.arctan2(yy - hinge[1], xx - hinge[0])
        texture = 1 - 0.18 * (0.5 + 0.5 * np.cos(theta * rng.integers(14, 22)))
    patch = colour * (light * texture)[..., None]
    m = mask[y0:y1, x0:x1].astype(np.float32)
    alpha = cv2.GaussianBlur(m, (3, 3), 0.6)[..., None]  # soft edge, like a real photo
    image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1 - alpha) + patch * alpha


# ---- masks and outlines ----------------------------------------------------------------------

def mask_to_polygon(mask: np.ndarray, tolerance: float = 1.0) -> np.ndarray:
    """The outer outline of a single-piece mask, following pixel edges; (K, 2) float xy pixels.

    Pixel (x, y) covers [x, x+1) x [y, y+1) in COCO, so a contour through pixel centres would shave
    half a pixel all round; tracing on a 4x upsampled mask puts the outline on the edges instead.
    ``tolerance`` (pixels) simplifies the outline the way a careful annotator's clicks would.
    """
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    crop = mask[y0:ys.max() + 1, x0:xs.max() + 1]
    up = cv2.resize(crop, None, fx=_UPSAMPLE, fy=_UPSAMPLE, interpolation=cv2.INTER_NEAREST)
    up = cv2.copyMakeBorder(up, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = cv2.approxPolyDP(max(contours, key=cv2.contourArea), tolerance * _UPSAMPLE, True)
    return (contour.reshape(-1, 2) - 1 + 0.5) / _UPSAMPLE + [x0, y0]


def polygon_iou(points: np.ndarray, mask: np.ndarray) -> float:
    """IoU between a polygon rasterised by pycocotools and ``mask``: what a reader will get back."""
    h, w = mask.shape
    drawn = mask_utils.decode(mask_utils.frPyObjects([points.ravel().tolist()], h, w))[..., 0]
    union = np.logical_or(drawn, mask).sum()
    return float(np.logical_and(drawn, mask).sum() / union) if union else 1.0


def _one_piece(mask: np.ndarray) -> bool:
    """True when the mask is a single region without holes (one polygon can describe it)."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return len(contours) == 1 and hierarchy[0][0][3] == -1


def _acceptable(visible: np.ndarray, full_area: float) -> bool:
    area = int(visible.sum())
    return (area >= MIN_PIXELS and area >= MIN_VISIBLE * full_area and _one_piece(visible)
            and polygon_iou(mask_to_polygon(visible), visible) >= POLY_IOU)


# ---- generation ------------------------------------------------------------------------------

def generate_one(seed: int, index: int) -> Sample:
    """Image ``index`` of the sample: (name, HxWx3 uint8 image, [(class, visible HxW uint8 mask)])."""
    rng = np.random.default_rng([seed, index])  # one generator per image: images are independent
    h, w = (int(v) for v in rng.integers(256, 513, 2))
    if abs(h - w) < 40:  # keep images visibly non-square
        w = min(512, h + 80) if h < 400 else h - 80
    image = _background(rng, h, w)
    instances: list[tuple[str, np.ndarray]] = []
    full_areas: list[float] = []
    n_objects = 0 if index in EMPTY else int(rng.integers(2, 6))
    for _ in range(n_objects):
        cls = CLASSES[int(rng.integers(len(CLASSES)))]
        size = rng.uniform(0.09, 0.2) * min(h, w) + 14
        outline = _OUTLINES[cls](rng, size)
        for _attempt in range(20):
            points = _place(rng, outline, h, w)
            mask = _fill(points, h, w)
            full_area = abs(cv2.contourArea(points.astype(np.float32)))
            # the frame may cut an object, but not hide most of it
            if not _acceptable(mask, full_area):
                continue
            occluded = [m & (1 - mask) for _, m in instances]
            changed = [(v, a) for v, (_, m), a in zip(occluded, instances, full_areas) if v.sum() < m.sum()]
            if all(_acceptable(v, a) for v, a in changed):
                break
        else:
            continue  # no room for this object
        _paint(rng, image, cls, mask, points)
        instances = [(c, v) for (c, _), v in zip(instances, occluded)] + [(cls, mask)]
        full_areas.append(full_area)
    grain = rng.normal(0, 2.0, image.shape).astype(np.float32)  # sensor noise, kept faint for JPEG size
    return f"img_{index + 1:04d}", np.clip(image + grain, 0, 255).astype(np.uint8), instances


def generate(seed: int = 0) -> list[Sample]:
    """All sample images in order: (name, HxWx3 uint8 RGB image, [(class, visible HxW uint8 mask)])."""
    total = sum(n for _, n in SPLITS)
    return [generate_one(seed, i) for i in range(total)]


# ---- Label Studio exports --------------------------------------------------------------------

def file_name(seed: int, name: str) -> str:
    """Label Studio prefixes uploads with 8 hex characters; ours are derived from seed and name."""
    return f"{hashlib.sha1(f'{seed}/{name}'.encode()).hexdigest()[:8]}-{name}.jpg"


def _timestamp(minutes: int) -> str:
    return f"2024-05-{1 + minutes // 1440:02d}T{minutes // 60 % 24:02d}:{minutes % 60:02d}:00.000000Z"


def _result_id(rng: np.random.Generator) -> str:
    return "".join(_ID_CHARS[i] for i in rng.integers(len(_ID_CHARS), size=10))


def _ls_result(rng: np.random.Generator, cls: str, mask: np.ndarray, brush: bool) -> dict:
    """One Label Studio result item: a polygon in percent of the image, or a brush RLE."""
    h, w = mask.shape
    if brush:
        # the editor stores an RGBA canvas; mask2rle repeats our 0/255 alpha into 4 channels
        value = {"format": "rle", "rle": mask2rle(mask * 255), "brushlabels": [cls]}
        kind, from_name = "brushlabels", "brush"
    else:
        points = [[x / w * 100, y / h * 100] for x, y in mask_to_polygon(mask).tolist()]
        value = {"points": points, "closed": True, "polygonlabels": [cls]}
        kind, from_name = "polygonlabels", "label"
    return {"original_width": w, "original_height": h, "image_rotation": 0, "value": value,
            "id": _result_id(rng), "from_name": from_name, "to_name": "image", "type": kind,
            "origin": "manual"}


def _task(task_id: int, project: int, fname: str, results: list[dict], minutes: int) -> dict:
    """A task as Label Studio's JSON export lists it, with one submitted annotation."""
    created, updated = _timestamp(minutes), _timestamp(minutes + 1)
    annotation = {
        "id": task_id, "completed_by": 1, "result": results, "was_cancelled": False,
        "ground_truth": False, "created_at": updated, "updated_at": updated,
        "draft_created_at": None, "lead_time": round(12.5 + 7.25 * len(results), 3), "prediction": {},
        "result_count": 0, "unique_id": hashlib.sha1(f"{project}/{task_id}".encode()).hexdigest(),
        "import_id": None, "last_action": None, "task": task_id, "project": project, "updated_by": 1,
        "parent_prediction": None, "parent_annotation": None, "last_created_by": None,
    }
    return {
        "id": task_id, "annotations": [annotation], "file_upload": fname, "drafts": [], "predictions": [],
        "data": {"image": f"/data/upload/{project}/{fname}"}, "meta": {}, "created_at": created,
        "updated_at": updated, "inner_id": task_id, "total_annotations": 1, "cancelled_annotations": 0,
        "total_predictions": 0, "comment_count": 0, "unresolved_comment_count": 0,
        "last_comment_updated_at": None, "project": project, "updated_by": 1, "comment_authors": [],
    }


def _coco_annotation(ann_id: int, image_id: int, category_id: int, result: dict, mask: np.ndarray) -> dict:
    """The COCO record Label Studio's converter makes of a polygon result (percent -> pixels)."""
    w, h = result["original_width"], result["original_height"]
    if result["type"] == "polygonlabels":
        pts = [(x / 100 * w, y / 100 * h) for x, y in result["value"]["points"]]
    else:  # brush: Label Studio drops these from COCO; we keep the traced outline (see module doc)
        pts = [(x, y) for x, y in mask_to_polygon(mask).tolist()]
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    # rounded: np.dot goes through BLAS, whose summation order (and so the last bits) differs between CPUs
    area = round(float(0.5 * np.abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))), 6)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": [[c for p in pts for c in p]],
            "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
            "ignore": 0, "iscrowd": 0, "area": area}


def write_split(out_dir: Path, project: int, samples: list[Sample], seed: int) -> None:
    """Write one split: images/, result.json (COCO export) and tasks.json (JSON export)."""
    rng = np.random.default_rng([seed, 1000 + project])
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, tasks = [], [], []
    written = {file_name(seed, name) for name, _, _ in samples}
    for stale in (out_dir / "images").glob("*.jpg"):  # left by an earlier seed or generator version
        if stale.name not in written:
            stale.unlink()
    for image_id, (name, image, instances) in enumerate(samples):
        fname = file_name(seed, name)
        Image.fromarray(image).save(out_dir / "images" / fname, quality=JPEG_QUALITY, optimize=True)
        h, w = image.shape[:2]
        images.append({"width": w, "height": h, "id": image_id, "file_name": f"images/{fname}"})
        results = [_ls_result(rng, cls, mask, bool(rng.random() < BRUSH_RATE)) for cls, mask in instances]
        for result, (cls, mask) in zip(results, instances):
            category_id = sorted(CLASSES).index(cls)
            annotations.append(_coco_annotation(len(annotations), image_id, category_id, result, mask))
        tasks.append(_task(image_id + 1, project, fname, results, minutes=7 * image_id))
    coco = {
        "images": images,
        "categories": [{"id": i, "name": name} for i, name in enumerate(sorted(CLASSES))],
        "annotations": annotations,
        "info": {"year": 2024, "version": "1.0", "description": "", "contributor": "Label Studio", "url": "",
                 "date_created": "2024-05-02 09:30:00.000000"},
    }
    # as Label Studio writes them: the converter indents COCO by 2; the JSON export is one compact line
    (out_dir / "result.json").write_text(json.dumps(coco, indent=2))
    (out_dir / "tasks.json").write_text(json.dumps(tasks, ensure_ascii=False, separators=(",", ":")))


def write(out_dir: str | Path, seed: int = 0, samples: list[Sample] | None = None) -> None:
    """Write every split under ``out_dir`` (train/, val/); ``samples`` defaults to ``generate(seed)``."""
    out_dir = Path(out_dir)
    samples = generate(seed) if samples is None else samples
    start = 0
    for project, (split, count) in enumerate(SPLITS, start=1):
        write_split(out_dir / split, project, samples[start:start + count], seed)
        start += count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "sample"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(args.out, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
