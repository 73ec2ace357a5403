"""``segkit check``: the report dict, ensure_trainable, and the command line (run as a real subprocess)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.exports import coco_ann, coco_export, ls_annotation, ls_rectangle, ls_task, square, write_image, write_json
from segkit.data import validate
from segkit.commands import check
from segkit.data.readers import DataError, load_dataset
from tests.helpers import REPO

KEYS = {"format", "images", "instances", "classes", "problems", "trainable", "object_px_median", "small_objects_hint"}


def segkit_check(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "segkit", "check", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def _good_export(folder: Path) -> Path:
    for name in ("a.png", "empty.png"):
        write_image(folder / "images" / name, size=(40, 30))
    coco_export(folder, [{"id": 0, "file_name": "images/a.png", "width": 40, "height": 30},
                         {"id": 1, "file_name": "images/empty.png", "width": 40, "height": 30},
                         {"id": 2, "file_name": "images/gone.png", "width": 40, "height": 30}],
                [coco_ann(1, 0, 0, [square(2, 2, 12, 12)]), coco_ann(2, 0, 1, [square(20, 5, 30, 25)]),
                 coco_ann(3, 0, 1, [], bbox=[1, 1, 5, 5])],
                [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}, {"id": 2, "name": "emu"}])
    return folder


def _rectangles_only(folder: Path) -> Path:
    write_image(folder / "photo.png", size=(50, 40))
    rects = [ls_rectangle(f"r{i}", "car", 10 * i, 10, 20, 20, 50, 40) for i in range(3)]
    return write_json(folder / "tasks.json", [ls_task(1, "/data/upload/2/0badf00d-photo.png", [ls_annotation(5, rects)])])


def test_report_counts_what_training_uses(tmp_path):
    result = validate.report(load_dataset(_good_export(tmp_path)))
    assert set(result) == KEYS
    assert result["format"] == "labelstudio-coco"
    assert result["images"] == 2  # the empty image is a negative; the missing one is not counted
    assert result["instances"] == 2 and result["classes"] == {"cat": 1, "dog": 1, "emu": 0}
    assert result["trainable"] is True
    assert {p["kind"] for p in result["problems"]} == {"missing_image", "box_without_mask"}
    box = next(p for p in result["problems"] if p["kind"] == "box_without_mask")
    assert set(box) == {"kind", "file", "detail"} and box["file"].endswith("result.json") and "annotation 3" in box["detail"]
    validate.ensure_trainable(load_dataset(tmp_path))  # does not raise


def test_check_says_when_objects_are_too_small_at_the_models_size_and_what_to_do(tmp_path):
    """20 px objects in a 4000 x 3000 photo are 3 px at 512: check suggests tiles; at 4096 they are not small."""
    write_image(tmp_path / "images" / "aerial.png", size=(4000, 3000))
    coco_export(tmp_path, [{"id": 0, "file_name": "images/aerial.png", "width": 4000, "height": 3000}],
                [coco_ann(i + 1, 0, 0, [square(100 * i, 100, 100 * i + 20, 120)]) for i in range(1, 6)],
                [{"id": 0, "name": "car"}])
    records = load_dataset(tmp_path)
    small = validate.report(records, img_size=512)
    assert small["object_px_median"] == pytest.approx(20 * 512 / 3000, abs=0.1)
    assert "--train-tiles 512" in small["small_objects_hint"] and "--tile auto" in small["small_objects_hint"]
    assert validate.report(records, img_size=4096)["small_objects_hint"] is None
    assert validate.report(load_dataset(_good_export(tmp_path / "good")))["small_objects_hint"] is None
    shown = segkit_check(str(tmp_path))
    assert shown.returncode == 0 and "hint: objects are small" in shown.stdout


def test_rectangles_only_is_not_trainable_and_says_why(tmp_path):
    records = load_dataset(_rectangles_only(tmp_path))
    assert validate.report(records)["trainable"] is False and validate.report(records)["instances"] == 0
    with pytest.raises(DataError) as e:
        validate.ensure_trainable(records)
    message = str(e.value)
    assert "tasks.json" in message and "no instance has a mask" in message and "rectangles" in message
    assert "PolygonLabels" in message and "BrushLabels" in message and "labelme" in message


def test_no_usable_images_is_not_trainable(tmp_path):
    coco_export(tmp_path, [{"id": 0, "file_name": "images/gone.png"}], [], [{"id": 0, "name": "a"}])
    with pytest.raises(DataError, match="no usable images.*1 missing_image"):
        validate.ensure_trainable(load_dataset(tmp_path))


def test_human_report_shows_table_and_problems_by_kind(tmp_path, capsys):
    args = argparse.Namespace(path=str(_good_export(tmp_path)), images=None, format=None, json=False, ls_token=None, img_size=512)
    assert check.run(args) == 0
    out = capsys.readouterr().out
    assert "2 images, 2 instances" in out and "images without objects (used as negative examples): 1" in out
    table = out[out.index("\nclass") + 1:]
    assert table.splitlines()[1].split() == ["cat", "1", "1"] and table.splitlines()[3].split() == ["emu", "0", "0"]
    assert "  box_without_mask (1)" in out and "annotation 3 (image 0)" in out and "  missing_image (1)" in out
    assert out.rstrip().endswith("trainable: yes")


def test_cli_json_is_one_object_with_exact_keys(tmp_path):
    done = segkit_check(str(_good_export(tmp_path)), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # nothing else on stdout
    assert set(result) == KEYS and result["instances"] == 2 and result["trainable"] is True


def test_cli_exit_codes_for_untrainable_and_unreadable(tmp_path):
    path = _rectangles_only(tmp_path / "rects")
    done = segkit_check(str(path))
    assert done.returncode == 1 and "NOT trainable" in done.stdout and "only rectangles/boxes" in done.stdout
    done = segkit_check(str(path), "--json")
    assert done.returncode == 1 and json.loads(done.stdout)["trainable"] is False
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "result.json").write_text('{"images": [{"id": 1,')
    done = segkit_check(str(tmp_path / "broken"))
    assert done.returncode == 2 and "broken/result.json: not valid JSON (line 1" in done.stderr
    done = segkit_check(str(tmp_path / "broken"), "--json")
    assert done.returncode == 2 and "not valid JSON" in json.loads(done.stdout)["error"]
