"""SegmentationDataset targets match the records; records_to_coco agrees with its numbering."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from segkit.data.records import ImageRecord, Instance
from tests.helpers import SAMPLE



def _records(n: int = 6) -> tuple[list[ImageRecord], list[str]]:
    """The first ``n`` val images of the sample, read straight from result.json (no reader needed)."""
    coco = json.loads((SAMPLE / "val" / "result.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    records = []
    for im in coco["images"][:n]:
        instances = [Instance(names[a["category_id"]], a["segmentation"],
                              (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]),
                              ann_id=a["id"])
                     for a in coco["annotations"] if a["image_id"] == im["id"]]
        records.append(ImageRecord(SAMPLE / "val" / im["file_name"], im["width"], im["height"], instances, im["id"]))
    return records, sorted(names.values())


def test_targets_match_decoded_records():
    from segkit.data.dataset import SegmentationDataset, collate_fn
    from segkit.data.transforms import build_transform

    records, classes = _records()
    records[0].instances.append(Instance("leaf", None, (0, 0, 5, 5)))  # a box without a mask: skipped
    dataset = SegmentationDataset(records, classes, build_transform("none"))
    assert len(dataset) == len(records)
    for i, rec in enumerate(records):
        image, target = dataset[i]
        assert image.shape == (3, rec.height, rec.width) and image.dtype == torch.float32
        assert target["image_id"] == i
        with_mask = [inst for inst in rec.instances if inst.segmentation is not None]
        assert target["labels"].tolist() == [classes.index(inst.label) + 1 for inst in with_mask]
        for k, inst in enumerate(with_mask):
            assert np.array_equal(target["masks"][k].numpy(), inst.mask(rec.height, rec.width))
    images, targets = collate_fn([dataset[0], dataset[1]])
    assert len(images) == 2 and targets[1]["image_id"] == 1


def test_unknown_class_is_named():
    from segkit.data.dataset import SegmentationDataset

    records, classes = _records(1)
    with pytest.raises(KeyError, match="leaf"):
        SegmentationDataset(records, [c for c in classes if c != "leaf"] + ["other"])[0]


def test_records_to_coco_evaluates_to_perfect_score():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from segkit.evaluation.coco import records_to_coco
    from segkit.data.dataset import SegmentationDataset
    from segkit.data.transforms import build_transform

    records, classes = _records()
    gt_dict = records_to_coco(records, classes)
    assert [im["id"] for im in gt_dict["images"]] == list(range(len(records)))
    assert [c["id"] for c in gt_dict["categories"]] == [1, 2, 3]
    assert min(a["id"] for a in gt_dict["annotations"]) == 1
    json.dumps(gt_dict)  # serialisable as is
    gt = COCO()
    gt.dataset = gt_dict
    gt.createIndex()
    # "predictions" made from the dataset's own targets must score AP 1: numbering agrees
    dataset = SegmentationDataset(records, classes, build_transform("none"))
    detections = []
    for i in range(len(dataset)):
        _, target = dataset[i]
        for mask, label in zip(target["masks"].numpy(), target["labels"].tolist()):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            detections.append({"image_id": target["image_id"], "category_id": label, "segmentation": rle, "score": 1.0})
    dt = gt.loadRes(detections)  # loadRes derives each detection's bbox from its mask
    for iou_type in ("segm", "bbox"):
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = list(range(len(records)))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)


def test_coco_boxes_match_dataset_boxes():
    from segkit.evaluation.coco import records_to_coco
    from segkit.data.dataset import SegmentationDataset

    records, classes = _records(3)
    gt = records_to_coco(records, classes)
    dataset = SegmentationDataset(records, classes)
    boxes = [b for i in range(len(dataset)) for b in dataset[i][1]["boxes"].tolist()]
    xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in gt["annotations"])]
    assert np.allclose(boxes, xyxy)
