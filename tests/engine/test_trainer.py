"""Training end to end on tiny data: outputs, resume, exact continuation after Ctrl-C, overfit."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from tests.helpers import instance_scores, tiny_config, tiny_train_args

from segkit.cli import main
from segkit.engine import loops as engine
from segkit.engine import trainer
from segkit.models.checkpoint import load_checkpoint
from segkit.inference.predictor import Predictor
from segkit.engine.trainer import TrainingStopped, train

REQUIRED_COLUMNS = {"epoch", "train_loss", "val_loss", "val_bbox_map", "val_segm_map", "val_segm_map50", "lr",
                    "seconds", "train_loss_mask", "val_loss_mask", "train_loss_classifier"}


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_epochs_write_every_output_and_resume_appends_a_row(tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(tiny_data, out, epochs=2, limit=2))
    for name in ("metrics.csv", "loss_curves.png", "metrics.png", "val_predictions.png", "config.json",
                 "split.json", "best.pt", "last.pt"):
        assert (out / name).stat().st_size > 0, name
    rows = _rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert REQUIRED_COLUMNS <= set(rows[0])
    assert all(np.isfinite(float(r["val_loss"])) for r in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 2 and config["weights"] == "none"
    assert summary["best"] == str(out / "best.pt")

    moved = shutil.copytree(tiny_data, tmp_path / "moved")  # the split is saved relative to the dataset
    assert json.loads((out / "split.json").read_text())["train"][0].startswith("train/images/")
    train(tiny_config(moved, tmp_path / "ignored", epochs=3, resume=str(out / "last.pt")))
    resumed = _rows(out / "metrics.csv")
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
    assert resumed[:2] == rows  # history continues, untouched
    assert load_checkpoint(out / "last.pt")["epoch"] == 3


def test_resuming_with_more_epochs_stretches_the_schedule(tiny_data, tmp_path):
    """``--epochs`` counts in total, also when resuming: a cosine schedule saved at its end (LR 0) must not
    make the added epochs train at LR 0; the decay is stretched over the new total."""
    # 2 images, 1 a step: 2 steps an epoch at half the cost of 4 images in pairs
    out, settings = tmp_path / "run", dict(eval_every=10, schedule="cosine", warmup_iters=1, limit=2, batch_size=1)
    train(tiny_config(tiny_data, out, epochs=1, **settings))
    before = load_checkpoint(out / "last.pt")["model"]
    train(tiny_config(tiny_data, tmp_path / "x", epochs=3, resume=str(out / "last.pt"), **settings))
    lr = load_checkpoint(out / "last.pt")["config"]["lr"]
    # cosine over 6 steps, read after steps 2, 4 and 6 (the first epoch ended its own 2-step schedule at 0)
    assert [float(r["lr"]) for r in _rows(out / "metrics.csv")] == pytest.approx([0.0, 0.25 * lr, 0.0], abs=1e-9)
    after = load_checkpoint(out / "last.pt")["model"]
    assert not torch.equal(before["roi_heads.box_predictor.cls_score.weight"],
                           after["roi_heads.box_predictor.cls_score.weight"])


def _record_saves(monkeypatch) -> list[tuple[str, int, int]]:
    """(file name, epochs done, step) of each checkpoint training writes."""
    saves, real = [], trainer.save_checkpoint

    def save(state, path):
        saves.append((path.name, state["epoch"], state.get("step", 0)))
        return real(state, path)

    monkeypatch.setattr(trainer, "save_checkpoint", save)
    return saves


def test_interrupted_then_resumed_run_ends_with_the_same_weights(tiny_data, tmp_path, monkeypatch):
    # 2 steps an epoch, augmented; an hour's --save-interval: no last.pt but the ones that are due
    settings = dict(epochs=2, eval_every=10, aug="default", limit=2, batch_size=1, save_interval=3600)
    saves = _record_saves(monkeypatch)
    straight = train(tiny_config(tiny_data, tmp_path / "straight", **settings))
    # the interval skipped epoch 1's last.pt; the end writes it, then best.pt (the only evaluation)
    assert saves == [("last.pt", 2, 0), ("best.pt", 2, 0)]

    real = engine.train_one_epoch
    calls = []

    def interrupt_in_second_epoch(*args, on_step=None, **kwargs):
        calls.append(1)

        def step(n):
            on_step(n)
            if len(calls) == 2 and n == 1:
                raise KeyboardInterrupt
        return real(*args, on_step=step, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", interrupt_in_second_epoch)
    with pytest.raises(TrainingStopped, match="resume with: python train.py --resume"):
        train(tiny_config(tiny_data, tmp_path / "cut", **settings))
    saved = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (1, 1)  # one finished epoch and one step of the next
    monkeypatch.setattr(engine, "train_one_epoch", real)
    train(tiny_config(tiny_data, tmp_path / "x", **settings, resume=str(tmp_path / "cut" / "last.pt")))

    a = load_checkpoint(straight["last"])["model"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_sigterm_between_epochs_saves_the_finished_epoch_the_interval_skipped(tiny_data, tmp_path, monkeypatch,
                                                                              capsys):
    """``kill``, ``docker stop`` or a scheduler's preemption (SIGTERM) stop ``segkit train`` as Ctrl-C does."""
    saves = _record_saves(monkeypatch)

    def terminate(run, row):
        os.kill(os.getpid(), signal.SIGTERM)  # after epoch 1's row is in the history, before its line is printed

    monkeypatch.setattr(trainer, "_print_epoch", terminate)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    assert main(tiny_train_args(tiny_data, out, 3, "--eval-every", "10", "--save-interval", "3600")) == 130
    assert f"resume with: python train.py --resume {out / 'last.pt'}" in capsys.readouterr().err
    saved = load_checkpoint(out / "last.pt")
    assert saves == [("last.pt", 1, 0)]
    assert (saved["epoch"], saved["step"], len(saved["history"])) == (1, 0, 1)
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back


def test_bad_data_stops_before_training_naming_the_file(tmp_path):
    bad = tmp_path / "export"
    bad.mkdir()
    (bad / "result.json").write_text('{"images": [')
    with pytest.raises(TrainingStopped, match="result.json"):
        train(tiny_config(bad, tmp_path / "run"))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_overfit_learns_the_four_images(overfit_run, tiny_data):
    """End-to-end proof that classes, masks and predictions line up: the checkpoint, reloaded by the
    Predictor, outlines each object of the images it learned with the right class.

    The fixture trained until training's own validation said so (``learned_instances``); this checks the
    same through the path users take, instance by instance, at the images' own size.
    """
    assert overfit_run["best_metrics"]["val_segm_map50"] >= 0.9
    scores = instance_scores(Predictor.from_checkpoint(overfit_run["best"]), tiny_data / "val")
    ious = [round(iou, 3) for iou, _ in scores]
    # The model sees 128 px copies of ~400 px images through a 28 x 28 mask head, which bounds how
    # tight its masks can be; AP50 >= 0.9 leaves room for two of the 18 instances below IoU 0.5.
    assert len(ious) == 18 and sum(iou < 0.5 for iou in ious) <= 2, ious
    assert np.mean(ious) >= 0.7, ious


def test_evaluate_reports_the_val_ap_that_training_recorded(overfit_run, tiny_data, tmp_path):
    """Training's validation and ``segkit evaluate`` see each image alone, so they agree on the same split."""
    from segkit.cli import main

    report = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", overfit_run["best"], "--data", str(tiny_data), "--split", "val",
                 "--json", str(report)]) == 0
    measured = json.loads(report.read_text())
    recorded = overfit_run["best_metrics"]
    assert measured["bbox"]["AP"] == pytest.approx(recorded["val_bbox_map"], abs=2e-3)
    assert measured["segm"]["AP"] == pytest.approx(recorded["val_segm_map"], abs=2e-3)
    assert measured["segm"]["AP50"] == pytest.approx(recorded["val_segm_map50"], abs=2e-3)


def test_best_checkpoint_reloads_to_identical_predictions(trained_checkpoint, tiny_data):
    image = next((tiny_data / "val" / "images").iterdir())
    first = Predictor.from_checkpoint(trained_checkpoint)(image)
    second = Predictor.from_checkpoint(trained_checkpoint)(image)
    assert len(first) > 0
    np.testing.assert_array_equal(first.masks, second.masks)
    np.testing.assert_array_equal(first.scores, second.scores)
    assert first.class_names == second.class_names


def test_non_finite_loss_names_the_images_and_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    from torchvision.models.detection import MaskRCNN

    real_forward = MaskRCNN.forward
    calls = []

    def forward(self, images, targets=None):
        out = real_forward(self, images, targets)
        if self.training and torch.is_grad_enabled():
            calls.append(1)
            if len(calls) > 1:  # the second epoch's step blows up
                out["loss_mask"] = out["loss_mask"] * float("nan")
        return out

    monkeypatch.setattr(MaskRCNN, "forward", forward)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped) as err:
        # --save-interval 0: last.pt is written after epoch 1, the last good one
        train(tiny_config(tiny_data, out, epochs=2, limit=2, eval_every=10, save_interval=0))
    message = str(err.value)
    assert "nan" in message and str(out / "last.pt") in message
    assert any(p.name in message for p in (tiny_data / "train" / "images").iterdir())
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_fine_tune_from_torchvision_format_weights_then_resume(tiny_data, tmp_path):
    """The transfer-learning path (frozen batch norm and early stages) trains, reloads and resumes."""
    from segkit.models.mask_rcnn import build_model

    torch.manual_seed(0)
    coco_like = build_model("maskrcnn_resnet50_fpn", 91, weights=None).state_dict()
    weights = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(coco_like, weights)
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, weights=str(weights), epochs=1, limit=2))
    best = load_checkpoint(out / "best.pt")
    assert best["frozen_bn"] is True
    frozen = coco_like["backbone.body.layer1.0.conv1.weight"]
    assert torch.equal(best["model"]["backbone.body.layer1.0.conv1.weight"], frozen)  # trainable_layers=3
    assert not torch.equal(best["model"]["backbone.body.layer4.0.conv1.weight"],
                           coco_like["backbone.body.layer4.0.conv1.weight"])
    train(tiny_config(tiny_data, tmp_path / "x", epochs=2, resume=str(out / "last.pt")))
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    assert torch.equal(load_checkpoint(out / "last.pt")["model"]["backbone.body.layer1.0.conv1.weight"], frozen)


def test_retraining_on_relabelled_data_keeps_each_class_head_by_name(untrained_checkpoint, tiny_data, tmp_path,
                                                                     capsys):
    """A served model retrained after a label was renamed: the others keep their heads, and the run says so."""
    data = tmp_path / "relabelled"
    shutil.copytree(tiny_data, data)
    for split in ("train", "val"):
        coco = json.loads((data / split / "result.json").read_text())
        coco["categories"] = [{**c, "name": "stone" if c["name"] == "pebble" else c["name"]} for c in coco["categories"]]
        (data / split / "result.json").write_text(json.dumps(coco))
    out = tmp_path / "run"
    train(tiny_config(data, out, weights=str(untrained_checkpoint), epochs=1, limit=2, lr=0.0))  # lr 0: rows as loaded
    said = capsys.readouterr().out
    assert "trained heads kept for leaf, shell; new for stone; not in this data: pebble" in said, said
    served, retrained = load_checkpoint(untrained_checkpoint), load_checkpoint(out / "last.pt")
    key = "roi_heads.box_predictor.cls_score.weight"
    for name in ("leaf", "shell"):
        old, new = served["classes"].index(name) + 1, retrained["classes"].index(name) + 1
        assert torch.equal(retrained["model"][key][new], served["model"][key][old]), name
