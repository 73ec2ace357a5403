"""MODEL_CARD.md: written by a tiny training (instance and semantic), and beside an exported model with its own AP."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from tests.helpers import require_module, tiny_config

from segkit.models.checkpoint import load_checkpoint
from segkit.cli import main
from segkit.engine.model_card import export_card_path, render_model_card
from segkit.engine.trainer import train

CLASSES = ("leaf", "pebble", "shell")


@pytest.fixture(scope="module")
def card_run(tiny_data, tmp_path_factory) -> Path:
    """2 epochs on 2 images at 64 px from random init: the run folder."""
    out = tmp_path_factory.mktemp("card") / "run"
    train(tiny_config(tiny_data, out, img_size=64, epochs=2, limit=2, roi_batch_size=64, warmup_iters=2))
    return out


def annotated_counts(data: Path, split: dict[str, list[str]]) -> dict[str, Counter]:
    """Instances per class of each split's images, counted from the export's own COCO files."""
    counts = {}
    for name, paths in split.items():
        counts[name] = Counter()
        for path in paths:
            folder, file_name = path.split("/", 1)
            coco = json.loads((data / folder / "result.json").read_text())
            image = next(im["id"] for im in coco["images"] if im["file_name"] == file_name)
            category = {c["id"]: c["name"] for c in coco["categories"]}
            counts[name].update(category[a["category_id"]] for a in coco["annotations"] if a["image_id"] == image)
    return counts


def test_the_card_names_classes_counts_metrics_and_limits(card_run, tiny_data):
    card = (card_run / "MODEL_CARD.md").read_text()
    split = json.loads((card_run / "split.json").read_text())
    counts = annotated_counts(tiny_data, split)
    assert "| class | train instances | val instances |" in card  # no test split: no test column
    for c in CLASSES:
        assert f"| {c} | {counts['train'][c]} | {counts['val'][c]} |" in card
    assert sum(counts["train"].values()) > 0
    assert f"- Export: `{tiny_data}`" in card and "- Images: train 2, val 2, test 0" in card

    best = load_checkpoint(card_run / "best.pt")
    scores = best["metrics"]
    assert f"| loss | {scores['val_loss']:.3f} |" in card and f"| mask AP | {scores['val_segm_map']:.3f} |" in card
    for c in CLASSES:
        assert f"| {c} | {scores[f'val_bbox_ap_{c}']:.3f} | {scores[f'val_segm_ap_{c}']:.3f} |" in card
    assert f"best (epoch {best['epoch']})" in card and "Finished after 2 of 2 epochs" in card
    assert "Trained from random init" in card and "Tiny dataset: 2 training images" in card
    assert "| weights | none |" in card and "| img_size | 64 |" in card and "2 epochs in" in card


def test_the_card_loads_its_model_as_it_says(card_run):
    from segkit import Predictor

    card = (card_run / "MODEL_CARD.md").read_text()
    path = re.search(r'Predictor\.from_checkpoint\("([^"]+)"\)', card).group(1)
    assert Path(path) == card_run / "best.pt"
    assert Predictor.from_checkpoint(path).classes == list(CLASSES)
    assert f"segkit predict photos/ --checkpoint {path}" in card and f"python demo.py --checkpoint {path}" in card


def test_a_label_studio_project_is_named_without_its_key(card_run):
    best = load_checkpoint(card_run / "best.pt")
    best["data_source"] = {"label_studio": "http://admin:s3cret@ls.example:8080", "project": 7, "title": "Shells",
                           "exported_at": "2026-01-02T03:04:05Z", "tasks": 12}
    best["config"] = {**best["config"], "data": "http://ls.example:8080/projects/7?token=s3cret"}
    card = render_model_card(best, card_run / "best.pt")
    assert 'Label Studio http://ls.example:8080, project 7 "Shells", exported 2026-01-02T03:04:05Z (12 tasks)' in card
    assert "s3cret" not in card


def test_export_writes_the_card_beside_the_model_with_its_own_ap(card_run, tmp_path, capsys):
    artifact = tmp_path / "model.torchscript"
    assert main(["export", "--checkpoint", str(card_run / "best.pt"), "--format", "torchscript",
                 "--out", str(artifact)]) == 0
    card_path = export_card_path(artifact)
    assert card_path == tmp_path / "model.MODEL_CARD.md" and str(card_path) in capsys.readouterr().out
    card = card_path.read_text()
    assert card.startswith((card_run / "MODEL_CARD.md").read_text().rstrip("\n"))  # the run's card, then the export
    assert main(["evaluate", "--checkpoint", str(artifact), "--split", "val", "--json", str(tmp_path / "ap.json")]) == 0
    ap = json.loads((tmp_path / "ap.json").read_text())
    assert (f"Its own AP: box AP {ap['bbox']['AP']:.3f}, mask AP {ap['segm']['AP']:.3f}: this file on the run's "
            "val split (2 images)") in card
    assert f'Predictor.from_checkpoint("{artifact.as_posix()}")' in card


def test_a_semantic_run_gets_its_card_and_tensorboard_scalars(tiny_data, tmp_path):
    require_module("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "semantic"
    train(tiny_config(tiny_data, out, task="semantic", model="unet_resnet18", img_size=64, epochs=2, limit=2,
                      optimizer="adamw", lr=1e-3, warmup_iters=1, tracker=("tensorboard",)))
    card, best = (out / "MODEL_CARD.md").read_text(), load_checkpoint(out / "best.pt")
    scores = best["metrics"]
    assert "Semantic segmentation (one class per pixel): `unet_resnet18`" in card
    assert f"| mIoU | {scores['val_miou']:.3f} |" in card and "| class | IoU (val) | Dice (val) |" in card
    for c in CLASSES:
        iou, dice = (scores[f"val_{k}_{c}"] for k in ("iou", "dice"))
        assert f"| {c} | {'-' if iou != iou else f'{iou:.3f}'} | {'-' if dice != dice else f'{dice:.3f}'} |" in card
    assert "| loss | ce+dice |" in card and "mask_head" not in card
    events = EventAccumulator(str(out), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val_miou")] == [1, 2]
    assert events.Scalars("val_miou")[best["epoch"] - 1].value == pytest.approx(scores["val_miou"], rel=1e-6)
