"""Readers: every format and quirk on tiny fake exports, plus the real Label Studio fixtures in ../shared."""
from __future__ import annotations

import base64
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.exports import (
    DESKS, LS_FIXTURES, coco_ann, coco_export, labelme_file, labelme_shape, ls_annotation, ls_brush, ls_polygon,
    ls_rectangle, ls_task, png_bytes, square, write_image, write_json,
)
from segkit.data.images import ImageError, image_size, load_image
from segkit.data.readers import FORMATS, DataError, load_dataset


def problems(records, kind):
    return [p for p in records.problems if p.kind == kind]


def by_name(records):
    return {r.path.name: r for r in records.images}


def disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def shoelace(xy):
    x, y = np.asarray(xy[0::2]), np.asarray(xy[1::2])
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


# --- images ---------------------------------------------------------------------------------------

def test_load_image_reads_content_not_extension_and_converts_modes(tmp_path):
    png_named_jpg = write_image(tmp_path / "really_png.jpg", size=(20, 10), fmt="PNG")
    im = load_image(png_named_jpg)
    assert im.mode == "RGB" and im.size == (20, 10) and im.getpixel((0, 0)) == (40, 80, 120)
    for mode in ("L", "LA", "P", "RGBA", "CMYK", "1"):
        path = tmp_path / f"m_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.new("RGB", (8, 6), (200, 200, 200)).convert(mode).save(path)
        assert load_image(path).mode == "RGB", mode
    sixteen = tmp_path / "16bit.png"
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I")
    assert np.asarray(load_image(sixteen))[0, :, 0].tolist() == [0, 128, 255]  # scaled, not clipped at 255


def test_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="nope.png: file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="notes.png: not an image"):
        image_size(tmp_path / "notes.png")
    noise = np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "good.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "good.jpg").read_bytes()[:5000])
    assert image_size(tmp_path / "cut.jpg") == (200, 150)  # the header survives...
    with pytest.raises(ImageError, match="cut.jpg: corrupt or truncated"):
        load_image(tmp_path / "cut.jpg")  # ...the pixels do not


def test_exif_orientation_swaps_size_and_rotates_pixels(tmp_path):
    path = write_image(tmp_path / "phone.jpg", size=(60, 40), fmt="JPEG", box=(0, 0, 20, 10), orientation=6)
    assert image_size(path) == (40, 60)
    a = np.asarray(load_image(path))
    assert a.shape == (60, 40, 3)
    assert a[5, 35, 0] > 200 and a[5, 35, 1] < 60  # raw top-left block is top-right after a 90° turn
    assert a[55, 5, 0] < 100


# --- Label Studio COCO ------------------------------------------------------------------------------

def _ls_coco_quirks(tmp_path):
    for name in ("a1b2c3d4-cat.png", "dog.png", "empty.png", "boxonly.png"):
        write_image(tmp_path / "images" / name, size=(64, 48))
    images = [
        {"id": 0, "file_name": "images\\a1b2c3d4-cat.png", "width": 64, "height": 48},  # Windows path
        {"id": 1, "file_name": "images/deadbeef-dog.png", "width": 64, "height": 48},  # hashed name, plain on disk
        {"id": 2, "file_name": "images/missing.png", "width": 64, "height": 48},
        {"id": 3, "file_name": "images/empty.png", "width": 64, "height": 48},
        {"id": 4, "file_name": "images/boxonly.png", "width": 64, "height": 48},
        {"id": 4, "file_name": "images/empty.png", "width": 64, "height": 48},
    ]
    anns = [
        coco_ann(1, 0, 0, [square(10, 10, 30, 20)]),
        coco_ann(2, 0, 1, [[1, 1, 2, 2]]),  # 2 points
        coco_ann(3, 1, 1, [square(50, 30, 80, 60)]),  # past the right and bottom edges
        coco_ann(4, 4, 0, [], bbox=[5, 5, 10, 10]),  # Label Studio rectangle
        coco_ann(5, 0, 7, [square(0, 0, 5, 5)]),
        coco_ann(1, 1, 0, [square(0, 0, 10, 10)]),  # reused id
    ]
    return coco_export(tmp_path, images, anns, [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}])


def test_labelstudio_coco_quirks(tmp_path):
    _ls_coco_quirks(tmp_path)
    records = load_dataset(tmp_path)
    assert records.format == "labelstudio-coco" and records.classes == ["cat", "dog"]
    images = by_name(records)
    assert set(images) == {"a1b2c3d4-cat.png", "dog.png", "empty.png"}  # missing and box-only left out
    assert images["empty.png"].instances == []  # a negative, kept, not a problem
    (cat,) = images["a1b2c3d4-cat.png"].instances
    m = cat.mask(48, 64)
    assert cat.label == "cat" and m[15, 20] == 1 and m[5, 5] == 0 and abs(int(m.sum()) - 200) <= 30
    assert cat.bbox[0] == pytest.approx(10, abs=1) and cat.bbox[3] == pytest.approx(20, abs=1)
    dog = next(i for i in images["dog.png"].instances if i.label == "dog")
    assert dog.bbox == pytest.approx((50, 30, 64, 48), abs=1)  # clipped to the image
    assert max(max(p[0::2]) for p in dog.segmentation) <= 64 and abs(int(dog.mask(48, 64).sum()) - 14 * 18) <= 30
    kinds = {p.kind for p in records.problems}
    assert {"missing_image", "degenerate_polygon", "out_of_bounds", "box_without_mask", "unknown_class",
            "duplicate_id", "no_usable_instances"} <= kinds
    assert "empty_image" not in kinds
    assert "annotation 2 " in problems(records, "degenerate_polygon")[0].detail
    assert "missing.png" in problems(records, "missing_image")[0].detail
    assert "category_id 7" in problems(records, "unknown_class")[0].detail
    assert all(p.file.endswith("result.json") for p in problems(records, "box_without_mask"))


def test_exif_rotated_jpeg_mask_aligns_with_loaded_image(tmp_path):
    write_image(tmp_path / "images" / "phone.jpg", size=(60, 40), fmt="JPEG", box=(0, 0, 20, 10), orientation=6)
    # Label Studio shows the photo upright (40x60) and the annotator outlines the red block there.
    coco_export(tmp_path, [{"id": 1, "file_name": "images/phone.jpg", "width": 40, "height": 60}],
                [coco_ann(1, 1, 0, [square(30, 0, 40, 20)])], [{"id": 0, "name": "block"}])
    records = load_dataset(tmp_path / "result.json")
    (image,) = records.images
    assert (image.width, image.height) == (40, 60) and not records.problems
    mask = image.instances[0].mask(image.height, image.width).astype(bool)
    a = np.asarray(load_image(image.path)).astype(int)
    red = (a[..., 0] > 180) & (a[..., 1] < 90)
    assert (red & mask).sum() / (red | mask).sum() > 0.85


def test_size_mismatch_hints_at_exif(tmp_path):
    write_image(tmp_path / "images" / "phone.jpg", size=(60, 40), fmt="JPEG", orientation=6)
    coco_export(tmp_path, [{"id": 1, "file_name": "images/phone.jpg", "width": 60, "height": 40}],
                [coco_ann(1, 1, 0, [square(1, 1, 10, 10)])], [{"id": 0, "name": "a"}])
    records = load_dataset(tmp_path)
    (p,) = problems(records, "size_mismatch")
    assert "60x40" in p.detail and "40x60" in p.detail and "EXIF" in p.detail
    assert (records.images[0].width, records.images[0].height) == (40, 60)


# --- plain COCO ---------------------------------------------------------------------------------------

def _uncompressed(mask):
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def test_coco_detectron2_layout_rle_crowd_and_sparse_ids(tmp_path):
    write_image(tmp_path / "data" / "images" / "0.jpg", size=(40, 30), fmt="JPEG")
    blob, crowd = disc(30, 40, 15, 10, 6), disc(30, 40, 15, 30, 5)
    compressed = mask_utils.encode(np.asfortranarray(crowd))
    compressed["counts"] = compressed["counts"].decode()
    anns = [
        coco_ann(10, 0, 17, [square(2, 2, 12, 12)]),
        coco_ann(11, 0, 3, _uncompressed(blob)),
        coco_ann(12, 0, 3, compressed, iscrowd=1),
        {"id": 13, "image_id": 0, "category_id": 17, "bbox": [1, 1, 5, 5]},
    ]
    coco_export(tmp_path / "data", [{"id": 0, "file_name": "0.jpg", "width": 40, "height": 30}], anns,
                [{"id": 3, "name": "zebra"}, {"id": 17, "name": "ant"}], label_studio=False, name="trainval.json")
    records = load_dataset(tmp_path / "data")
    assert records.format == "coco" and records.classes == ["zebra", "ant"]  # category id order
    (image,) = records.images
    assert image.path == tmp_path / "data" / "images" / "0.jpg"
    inst = {i.ann_id: i for i in image.instances}
    assert set(inst) == {10, 11, 12}
    assert np.array_equal(inst[11].mask(30, 40), blob) and np.array_equal(inst[12].mask(30, 40), crowd)
    assert inst[12].iscrowd and not inst[11].iscrowd and inst[10].label == "ant"
    assert json.dumps(inst[11].segmentation)  # compressed to a JSON-safe RLE
    assert "annotation 13" in problems(records, "box_without_mask")[0].detail


# --- Label Studio JSON --------------------------------------------------------------------------------

def test_labelstudio_json_regions_and_annotation_choice(tmp_path):
    w, h = 80, 60
    write_image(tmp_path / "imgs" / "photo.png", size=(w, h))  # uploaded as /data/upload/3/ab12cd34-photo.png
    write_image(tmp_path / "sub" / "dir" / "second.png", size=(w, h))
    brush = disc(h, w, 40, 60, 9)
    chosen = ls_annotation(7, [
        ls_polygon("p1", "cat", [[10, 10], [50, 10], [50, 50], [10, 50]], w, h),
        ls_brush("b1", "dog", brush),
        ls_rectangle("r1", "cat", 50, 10, 25, 20, w, h, rotation=90),
        {"id": "e1", "type": "ellipselabels", "original_width": w, "original_height": h,
         "value": {"x": 25, "y": 75, "radiusX": 10, "radiusY": 10, "rotation": 0, "ellipselabels": ["dog"]}},
        {"id": "k1", "type": "keypointlabels", "value": {"x": 5, "y": 5, "keypointlabels": ["nose"]}},
        {"id": "c1", "type": "choices", "value": {"choices": ["indoor"]}},
    ], updated_at="2024-05-01T10:00:00Z")
    triangle = [[0, 0], [9, 0], [9, 9]]
    older = ls_annotation(6, [ls_polygon("o1", "old", triangle, w, h)], updated_at="2023-01-01T00:00:00.5Z")
    cancelled = ls_annotation(8, [ls_polygon("x1", "skip", triangle, w, h)], "2025-01-01T00:00:00Z", was_cancelled=True)
    tasks = [
        ls_task(1, "/data/upload/3/ab12cd34-photo.png", [older, chosen, cancelled]),
        ls_task(2, "/data/local-files/?d=sub/dir/second.png", [ls_annotation(9, [])]),
        ls_task(3, "/data/upload/3/cafe1234-x.png", [cancelled]),
        ls_task(4, "/data/upload/3/cafe1234-gone.png", [ls_annotation(10, [ls_polygon("g", "cat", triangle, w, h)])]),
    ]
    write_json(tmp_path / "export.json", tasks)
    records = load_dataset(tmp_path)
    assert records.format == "labelstudio-json"
    assert records.classes == ["cat", "dog"]  # from the used annotations only
    images = by_name(records)
    assert set(images) == {"photo.png", "second.png"} and images["second.png"].instances == []
    inst = {i.ann_id: i for i in images["photo.png"].instances}
    assert set(inst) == {"p1", "b1", "e1"}
    assert abs(int(inst["e1"].mask(h, w).sum()) - math.pi * 8 * 6) < 20  # radii 10 % of 80 and of 60
    assert abs(int(inst["p1"].mask(h, w).sum()) - 32 * 24) <= 40  # 10..50 % of 80x60
    assert np.array_equal(inst["b1"].mask(h, w), brush)
    assert "[28.0, 6.0, 40.0, 26.0]" in problems(records, "box_without_mask")[0].detail  # rotated about top-left
    (multi,) = problems(records, "multiple_annotations")
    assert "used annotation 7" in multi.detail and "task 1" in multi.detail
    assert "cancelled" in problems(records, "unlabeled_task")[0].detail
    assert "gone.png" in problems(records, "missing_image")[0].detail


# --- labelme ------------------------------------------------------------------------------------------

def test_labelme_groups_circles_ignore_and_embedded_image(tmp_path):
    write_image(tmp_path / "a.png", size=(64, 48))
    labelme_file(tmp_path / "a.json", [
        labelme_shape("cat", [[2, 2], [12, 2], [12, 12], [2, 12]], group_id=1),
        labelme_shape("cat", [[20, 2], [30, 2], [30, 12], [20, 12]], group_id=1),  # same cat behind a pole
        labelme_shape("dog", [[40, 2], [50, 2], [50, 12]], group_id=1),
        labelme_shape("ball", [[40, 30], [40, 38]], "circle"),
        labelme_shape("__ignore__", [[0, 40], [10, 40], [10, 47]]),
        labelme_shape("cat", [[1, 1], [5, 5]], "rectangle"),
        labelme_shape("nose", [[3, 3]], "point"),
        {**labelme_shape("blob", [[50, 40], [55, 43]], "mask"),
         "mask": base64.b64encode(png_bytes((6, 4), (255, 255, 255))).decode()},
    ], "a.png", (64, 48))
    labelme_file(tmp_path / "sub" / "b.json", [labelme_shape("dog", [[1, 1], [20, 1], [20, 20]])],
                 "missing_dir\\b.png", (32, 24), image_data=png_bytes((32, 24)))
    records = load_dataset(tmp_path)
    assert records.format == "labelme" and records.classes == ["ball", "blob", "cat", "dog"]
    images = by_name(records)
    a = images["a.png"]
    labels = sorted(i.label for i in a.instances)
    assert labels == ["ball", "blob", "cat", "dog"]  # one cat from two polygons; no __ignore__, no point
    cat = next(i for i in a.instances if i.label == "cat")
    assert len(cat.segmentation) == 2 and abs(int(cat.mask(48, 64).sum()) - 200) <= 30
    ball = next(i for i in a.instances if i.label == "ball")
    assert abs(int(ball.mask(48, 64).sum()) - math.pi * 64) < 25
    blob = next(i for i in a.instances if i.label == "blob").mask(48, 64)
    assert blob.sum() == 24 and blob[40:44, 50:56].all()  # labelme 5 mask shape pasted at its box
    assert len(problems(records, "box_without_mask")) == 1
    (b,) = [r for r in records.images if r is not a]
    assert b.path.parent == tmp_path / ".segkit_cache" and load_image(b.path).size == (32, 24)
    assert load_dataset(tmp_path).images[1].path == b.path  # cached once, reused


# --- splits, detection, bad input ---------------------------------------------------------------------

def test_split_folders_prefer_result_json_and_merge_classes(tmp_path):
    for split, label in (("train", "cat"), ("val", "bird")):
        folder = tmp_path / split
        write_image(folder / "images" / "x.png", size=(32, 32))
        coco_export(folder, [{"id": 0, "file_name": "images/x.png", "width": 32, "height": 32}],
                    [coco_ann(1, 0, 0, [square(2, 2, 20, 20)])], [{"id": 0, "name": label}])
        write_json(folder / "tasks.json", [ls_task(1, "images/x.png", [ls_annotation(1, [
            ls_polygon("t", "from_tasks", [[1, 1], [50, 1], [50, 50]], 32, 32)])])])
    records = load_dataset(tmp_path)
    assert records.classes == ["bird", "cat"]
    assert [(r.split, r.instances[0].label) for r in records.images] == [("train", "cat"), ("val", "bird")]
    assert load_dataset(tmp_path / "train" / "tasks.json").classes == ["from_tasks"]


def test_images_dir_is_searched_first(tmp_path):
    write_image(tmp_path / "export" / "images" / "x.png", size=(32, 32))
    write_image(tmp_path / "elsewhere" / "x.png", size=(16, 16))
    coco_export(tmp_path / "export", [{"id": 0, "file_name": "images/x.png"}],
                [coco_ann(1, 0, 0, [square(2, 2, 10, 10)])], [{"id": 0, "name": "a"}])
    assert load_dataset(tmp_path / "export").images[0].width == 32
    assert load_dataset(tmp_path / "export", images_dir=tmp_path / "elsewhere").images[0].width == 16


def test_never_looks_outside_the_export_folder(tmp_path):
    write_image(tmp_path / "x.png", size=(32, 32))
    coco_export(tmp_path / "export", [{"id": 0, "file_name": "../x.png"}],
                [coco_ann(1, 0, 0, [square(2, 2, 10, 10)])], [{"id": 0, "name": "a"}])
    records = load_dataset(tmp_path / "export")
    assert records.images == [] and problems(records, "missing_image")


def test_bad_inputs_raise_data_error_naming_the_file(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "result.json").write_text('{"images": [\n  {"id": 1,\n    "file_name" "a.jpg"}')
    with pytest.raises(DataError, match=r"t/result.json: not valid JSON \(line 3 column 17\)"):
        load_dataset(tmp_path / "t")
    cases = {"empty.json": ("", "empty file"), "tasks.json": ("[]", "no tasks"),
             "coco.json": ('{"images": [], "annotations": []}', "lists no images"), "odd.json": ('{"a": 1}', "not a known")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name}: .*{message}"):
            load_dataset(tmp_path / name)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no annotation export found"):
        load_dataset(tmp_path / "nothing")
    with pytest.raises(DataError, match="looks like coco, not labelme"):
        load_dataset(tmp_path / "coco.json", fmt="labelme")
    with pytest.raises(DataError, match="unknown format"):
        load_dataset(tmp_path, fmt="yolo")
    assert "labelme" in FORMATS


def test_corrupt_image_is_dropped_with_a_problem(tmp_path):
    write_image(tmp_path / "images" / "ok.png", size=(32, 32))
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG garbage")
    coco_export(tmp_path, [{"id": i, "file_name": f"images/{n}.png"} for i, n in enumerate(("ok", "bad"))],
                [coco_ann(i, i, 0, [square(2, 2, 10, 10)]) for i in range(2)], [{"id": 0, "name": "a"}])
    records = load_dataset(tmp_path)
    assert [r.path.name for r in records.images] == ["ok.png"]
    (p,) = problems(records, "unreadable_image")
    assert p.file.endswith("bad.png") and "image 1" in p.detail


# --- real Label Studio fixtures -----------------------------------------------------------------------

def _need(path):
    if not path.exists():
        pytest.skip(f"{path} not available")


def test_real_labelstudio_coco_desks():
    _need(DESKS)
    records = load_dataset(DESKS)
    coco = json.loads((DESKS / "result.json").read_text())
    assert records.format == "labelstudio-coco" and not records.problems
    assert records.classes == [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    assert len(records.images) == 5 and sum(len(r.instances) for r in records.images) == len(coco["annotations"])
    area = {a["id"]: a["area"] for a in coco["annotations"]}
    for image in records.images:
        for inst in image.instances:
            assert int(inst.mask(image.height, image.width).sum()) == pytest.approx(area[inst.ann_id], rel=0.05)


def _copy_with_images(src, tmp_path, sizes):
    shutil.copy(src, tmp_path / src.name)
    for name, size in sizes.items():
        write_image(tmp_path / name, size=size, fmt="JPEG")
    return load_dataset(tmp_path / src.name)


def test_real_labelstudio_json_polygon_rectangle_keypoints(tmp_path):
    src = LS_FIXTURES / "data" / "test_export_coco" / "data.json"
    _need(src)
    records = _copy_with_images(src, tmp_path, {"test_image1.jpg": (500, 320)})
    (image,) = records.images
    (poly,) = image.instances  # the rectangle has no mask; keypoints are not objects
    points = json.loads(src.read_text())[0]["annotations"][0]["result"][1]["value"]["points"]
    expected = shoelace([c for x, y in points for c in (x * 5, y * 3.2)])
    assert poly.label == "polygon_label" and int(poly.mask(320, 500).sum()) == pytest.approx(expected, rel=0.25)
    assert [p.kind for p in records.problems] == ["box_without_mask"]


def test_real_labelstudio_json_polygons(tmp_path):
    src = LS_FIXTURES / "data" / "test_export_yolo" / "data_polygons.json"
    _need(src)
    records = _copy_with_images(src, tmp_path, {"image2.jpg": (640, 426)})  # data.image is "/image2"
    (inst,) = records.images[0].instances
    points = json.loads(src.read_text())[0]["annotations"][0]["result"][0]["value"]["points"]
    expected = shoelace([c for x, y in points for c in (x * 6.4, y * 4.26)])
    assert inst.label == "Airplane" and int(inst.mask(426, 640).sum()) == pytest.approx(expected, rel=0.05)


def test_real_rotated_rectangles_match_converter(tmp_path):
    src = LS_FIXTURES / "data" / "test_export_yolo" / "data_obb.json"
    _need(src)
    from label_studio_converter.utils import convert_annotation_to_yolo_obb

    tasks = json.loads(src.read_text())
    sizes = {}
    for task in tasks:
        r = task["annotations"][0]["result"][0]
        sizes[task["data"]["image"].strip("/") + ".png"] = (r["original_width"], r["original_height"])
    records = _copy_with_images(src, tmp_path, sizes)
    boxes = problems(records, "box_without_mask")
    results = [r for t in tasks for r in t["annotations"][0]["result"]]
    assert records.images == [] and len(boxes) == len(results)
    for p, r in zip(boxes, results):
        corners = convert_annotation_to_yolo_obb({**r["value"], **r})
        xs = [x * r["original_width"] for x, _ in corners]
        ys = [y * r["original_height"] for _, y in corners]
        got = json.loads(p.detail[p.detail.index("["):p.detail.index("]") + 1])
        assert got == pytest.approx([min(xs), min(ys), max(xs), max(ys)], abs=0.06)


def test_real_brush_png(tmp_path):
    src = LS_FIXTURES / "test.png"
    _need(src)
    from label_studio_converter.brush import image2annotation

    ann = image2annotation(str(src), "blob", "brush", "image")
    result = ann["result"][0]
    w, h = result["original_width"], result["original_height"]
    write_image(tmp_path / "photo.jpg", size=(w, h), fmt="JPEG")
    write_json(tmp_path / "tasks.json", [ls_task(1, "/data/upload/1/0a1b2c3d-photo.jpg", [{**ann, "id": 1}])])
    records = load_dataset(tmp_path)
    (inst,) = records.images[0].instances
    expected = np.asarray(Image.open(src).convert("L")) > 128
    assert inst.label == "blob" and np.array_equal(inst.mask(h, w).astype(bool), expected)
