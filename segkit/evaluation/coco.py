"""Everything COCO: ground truth from records, predictions as COCO results, and COCOeval (pycocotools).

One numbering everywhere: category ids are labels ``1..N`` (``classes[i]`` is ``i + 1``), RLE masks
with ``counts`` as text (JSON-able), boxes ``[x, y, w, h]`` in pixels. ``segkit predict``'s
``predictions.json``, the demo's COCO download, training's validation and ``segkit evaluate`` all
build their entries with :func:`prediction_to_coco`, so they carry the same fields.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segkit.data.records import ImageRecord, label_map

if TYPE_CHECKING:
    from segkit.structures.prediction import Prediction

IOU_TYPES = ("bbox", "segm")
PR_IOU = 0.5  # the IoU threshold of the precision-recall curves


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A boolean or 0/1 (H, W) mask as a JSON-able COCO RLE."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON
    return rle


def categories(classes: Sequence[str]) -> list[dict[str, Any]]:
    """COCO categories for ``classes``: ids 1..N."""
    return [{"id": label, "name": name, "supercategory": ""} for name, label in label_map(classes).items()]


def records_to_coco(images: Sequence[ImageRecord], classes: Sequence[str]) -> dict:
    """A COCO ground-truth dict for COCOeval, numbered like :class:`segkit.data.dataset.SegmentationDataset`.

    Image ids are list indices, segmentations are RLE of the decoded mask at the record's size, boxes
    are the mask's tight xywh box. Instances without a mask, and with an empty one, are left out;
    crowd regions are kept with ``iscrowd`` 1.
    """
    labels = label_map(classes)
    coco_images, annotations = [], []
    for image_id, rec in enumerate(images):
        coco_images.append({"id": image_id, "file_name": str(rec.path), "width": rec.width, "height": rec.height})
        for inst in rec.instances:
            if inst.segmentation is None:
                continue
            mask = inst.mask(rec.height, rec.width)
            if not mask.any():
                continue
            rle = encode_mask(mask)
            annotations.append({
                # ids start at 1: COCOeval records a match by storing the gt id, so id 0 reads as unmatched
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": labels[inst.label],
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": int(inst.iscrowd),
            })
    return {"info": {"description": "segkit ground truth"}, "licenses": [], "images": coco_images,
            "categories": categories(classes), "annotations": annotations}


def prediction_to_coco(image_id: int, prediction: Prediction) -> list[dict[str, Any]]:
    """COCO result entries for one image: category id, score, xywh box, RLE mask and its area."""
    results = []
    masks = prediction.instance_masks  # RLE straight from each box-sized crop: no full-size mask
    for i, (box, label, score) in enumerate(zip(prediction.boxes, prediction.labels, prediction.scores)):
        rle = masks.rle(i)
        x1, y1, x2, y2 = (float(v) for v in box)
        results.append({"image_id": int(image_id), "category_id": int(label), "score": float(score),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": rle,
                        "area": int(mask_utils.area(rle))})
    return results


def image_entry(file_name: str, width: int, height: int, prediction: Prediction) -> dict[str, Any]:
    """One image's predictions as a JSON-able dict: its path and size, and COCO annotations with class names.

    ``segkit predict`` keeps one entry per image on disk, so the final files can be rebuilt from all
    images, old and new. An optional ``image_ref`` key, added by the caller, is what
    :func:`segkit.labelstudio.preannotations.to_labelstudio` appends to ``image_root_url``.
    """
    annotations = []
    for ann, name in zip(prediction_to_coco(0, prediction), prediction.class_names):
        del ann["image_id"]
        annotations.append({**ann, "label": name})
    return {"file_name": file_name, "width": int(width), "height": int(height), "annotations": annotations}


def predictions_file(entries: Sequence[dict[str, Any]], classes: Sequence[str]) -> dict[str, Any]:
    """A COCO file of predictions with its images and categories: image ids 1..N in entry order,
    annotation ids 1..M (in the demo, annotation ``i`` is pixel value ``i`` of the instance PNG)."""
    images, annotations = [], []
    for image_id, entry in enumerate(entries, start=1):
        images.append({"id": image_id, "file_name": entry["file_name"], "width": entry["width"],
                       "height": entry["height"]})
        for ann in entry["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ann["category_id"],
                                "category_name": ann["label"], "segmentation": ann["segmentation"],
                                "bbox": ann["bbox"], "area": ann["area"], "score": ann["score"], "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": categories(classes)}


def _coco_from_dict(gt: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = {"info": {}, "licenses": [], **gt}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(gt: dict[str, Any], results: list[dict[str, Any]],
                  image_ids: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """Run COCOeval once for boxes and once for masks.

    Returns ``{"bbox": {"AP", "AP50", "AP75", "AP_small", "per_class": {name: AP}, "pr_curves": {name: precision}},
    "segm": {...}}`` (``AP_small``: None when the ground truth has no object under 32 x 32 px); ``pr_curves``
    holds precision at COCO's 101 recall points at IoU 0.5 (all areas, 100 detections). Classes without
    ground truth in these images get no per-class AP (NaN is not a score).
    """
    coco_gt = _coco_from_dict(gt)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    out: dict[str, dict[str, Any]] = {}
    for iou_type in IOU_TYPES:
        if not results:  # COCOeval cannot load an empty result list: nothing found, nothing right
            with_gt = [names[c] for c in names if coco_gt.getAnnIds(catIds=[c])]
            small = any(a.get("area", 0) < 32 ** 2 for a in gt["annotations"] if not a.get("iscrowd"))
            out[iou_type] = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AP_small": 0.0 if small else None,
                             "per_class": dict.fromkeys(with_gt, 0.0),
                             "pr_curves": {name: [0.0] * 101 for name in with_gt}}
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
                         # objects under 32 x 32 px; None where the images have none (COCOeval's -1)
                         "AP_small": None if ev.stats[3] < 0 else float(ev.stats[3]),
                         "per_class": _per_class_ap(ev, names), "pr_curves": _pr_curves(ev, names, PR_IOU)}
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


def _pr_curves(ev: COCOeval, names: dict[int, str], iou: float) -> dict[str, list[float]]:
    t = int(np.argmin(np.abs(ev.params.iouThrs - iou)))
    curves = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = ev.eval["precision"][t, :, k, 0, -1]
        if (p > -1).any():  # -1: the class has no ground truth here
            curves[names[cat_id]] = [round(float(v), 4) for v in np.clip(p, 0, None)]
    return curves
