"""COCO box and mask AP with pycocotools, from in-memory ground truth and predictions."""
from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_TYPES = ("bbox", "segm")


def prediction_to_coco(image_id: int, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                       masks: np.ndarray) -> list[dict[str, Any]]:
    """COCO result entries (xywh boxes, RLE masks) for one image; masks are boolean (N, H, W)."""
    results = []
    for box, label, score, mask in zip(boxes, labels, scores, masks):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        x1, y1, x2, y2 = (float(v) for v in box)
        results.append({"image_id": int(image_id), "category_id": int(label), "score": float(score),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": rle})
    return results


def _coco_from_dict(gt: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = {"info": {}, "licenses": [], **gt}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(gt: dict[str, Any], results: list[dict[str, Any]],
                  image_ids: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """Run COCOeval for boxes and masks.

    Returns ``{"bbox": {"AP", "AP50", "AP75", "per_class": {name: AP}}, "segm": {...}}``. Classes
    without ground truth in these images get no per-class AP (NaN is not a score).
    """
    coco_gt = _coco_from_dict(gt)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    out: dict[str, dict[str, Any]] = {}
    for iou_type in IOU_TYPES:
        if not results:
            out[iou_type] = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_class": {
                names[c]: 0.0 for c in names if coco_gt.getAnnIds(catIds=[c])}}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {"AP": _nonneg(ev.stats[0]), "AP50": _nonneg(ev.stats[1]), "AP75": _nonneg(ev.stats[2]),
                         "per_class": _per_class_ap(ev, names)}
    return out


def _nonneg(x: float) -> float:
    # COCOeval reports -1 when there is no ground truth at all; that is "no score", shown as 0.
    return float(max(x, 0.0))


def _per_class_ap(ev: COCOeval, names: dict[int, str]) -> dict[str, float]:
    precision = ev.eval["precision"]  # (iou thresholds, recall, classes, area ranges, max dets)
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            per_class[names[cat_id]] = float(p.mean())
    return per_class
