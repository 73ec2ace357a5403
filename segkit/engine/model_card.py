"""MODEL_CARD.md: what a trained model is, what it was trained on, how well it does and how to run it.

The trainer writes one into every run folder (:func:`write_model_card`), again at each better epoch
and at the end; ``segkit export`` writes one beside the exported file (:func:`write_export_card`) with
that file's own AP. Everything in it comes from the checkpoint, the run's history and the split: it
is rewritten, never edited. Data from a live Label Studio project is named by server and project;
no key is ever stored where the card could read it.
"""
from __future__ import annotations

import math
import os
import platform
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from segkit.version import __version__
from segkit.atomic import atomic_write
from segkit.data.records import ImageRecord
from segkit.labelstudio.client import redact as redact_url
from segkit.models.checkpoint import load_checkpoint
from segkit.tasks.wording import wording

CARD_NAME = "MODEL_CARD.md"
SMALL_TRAIN_IMAGES = 100  # fewer training images than this is called a small dataset
FEW_INSTANCES = 10  # a class with fewer training instances than this is named as a limit

# the settings a reader needs to judge or repeat the run, in the order shown (those of one task only: its
# ``card_settings``; the task also names the metrics shown, see segkit.tasks.base.Task)
SETTINGS = ("weights", "img_size", "epochs", "batch_size", "optimizer", "lr", "schedule", "warmup_iters", "aug",
            "mask_head", "roi_batch_size", "trainable_layers", "loss", "score_threshold", "seed", "limit")
TASK_SETTINGS = {"mask_head", "roi_batch_size", "trainable_layers", "loss"}


def instance_counts(splits: dict[str, Sequence[ImageRecord]]) -> dict[str, dict[str, int]]:
    """Annotated instances per split and class: ``{"train": {"leaf": 7, ...}, "val": {...}}``."""
    return {split: dict(Counter(inst.label for record in records for inst in record.instances))
            for split, records in splits.items()}


def hardware(device, world: int = 1) -> str:
    """The hardware a run trains on, in words: ``"1 x NVIDIA H100 80GB HBM3"``, ``"CPU (x86_64, 16 cores)"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{world} x {torch.cuda.get_device_name(device)}"
    what = f"{device.type.upper()} ({_cpu_name()}, {os.cpu_count()} cores)"
    return what if world == 1 else f"{world} processes on {what}"


def write_model_card(out: str | os.PathLike, best: dict[str, Any], history: Sequence[dict] = (),
                     counts: dict[str, dict[str, int]] | None = None, test: dict[str, float] | None = None,
                     hardware: str | None = None, final: bool = False) -> Path:
    """Write ``out/MODEL_CARD.md`` for the run whose best checkpoint is ``best`` (a checkpoint dict: its
    weights are not read), with the run's ``history`` (metrics.csv rows), ``counts`` (:func:`instance_counts`),
    ``test`` metrics of the best checkpoint and the ``hardware`` string; ``final`` once training is over."""
    out = Path(out)
    text = render_model_card(best, out / "best.pt", history, counts, test, hardware, final)
    return atomic_write(out / CARD_NAME, text)


def render_model_card(best: dict[str, Any], checkpoint: str | os.PathLike, history: Sequence[dict] = (),
                      counts: dict[str, dict[str, int]] | None = None, test: dict[str, float] | None = None,
                      hardware: str | None = None, final: bool = True) -> str:
    """The card's Markdown (see :func:`write_model_card`); ``checkpoint`` is the file the usage lines load."""
    cfg = best.get("config") or {}
    name = Path(cfg["out"]).name if cfg.get("out") else Path(checkpoint).resolve().parent.name
    sections = [f"# Model card: {name}", _summary(best, history, final), _classes(best, counts),
                _data(best), _settings(best), _results(best, history, test), _time(history, hardware),
                _limits(best, history, counts, final), usage(checkpoint)]
    return "\n\n".join(s for s in sections if s) + "\n"


def _summary(best: dict, history: Sequence[dict], final: bool) -> str:
    cfg, what = best.get("config") or {}, wording(best.get("task")).card_kind(best)
    done = len(history) or best.get("epoch") or 0
    state = ("Training history not recorded in the checkpoint" if not done else
             f"Finished after {done} of {cfg.get('epochs', done)} epochs" if final else
             f"Training: epoch {done} of {cfg.get('epochs', '?')}; this card is rewritten at each better epoch "
             "and at the end")
    return (f"{what}: `{best['arch']}`, {len(best['classes'])} classes, {best['img_size']} px "
            f"(shorter side). Trained with segkit {best.get('segkit_version', _version())}.\n\n"
            f"{state} (written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC).")


def _classes(best: dict, counts: dict[str, dict[str, int]] | None) -> str:
    classes = best["classes"]
    splits = [s for s in ("train", "val", "test") if (counts or {}).get(s) is not None and
              len((best.get("split") or {}).get(s) or []) > 0]
    if not splits:
        return "## Classes\n\n" + ", ".join(f"`{c}`" for c in classes)
    rows = [[c, *(counts[s].get(c, 0) for s in splits)] for c in classes]
    return "## Classes\n\n" + _table(["class", *(f"{s} instances" for s in splits)], rows)


def _data(best: dict) -> str:
    cfg, split, source = best.get("config") or {}, best.get("split") or {}, best.get("data_source")
    lines = ["## Data", ""]
    if source:  # a live Label Studio project: named by server and project, never by key
        title = f' "{source["title"]}"' if source.get("title") else ""
        lines.append(f"- Label Studio {redact(str(source.get('label_studio', '?')))}, project "
                     f"{source.get('project', '?')}{title}, exported {source.get('exported_at', '?')}"
                     + (f" ({source['tasks']} tasks)" if source.get("tasks") is not None else ""))
    elif cfg.get("data"):
        fmt = f" (format {cfg['format']})" if cfg.get("format") else ""
        lines.append(f"- Export: `{redact(str(cfg['data']))}`{fmt}")
    else:
        lines.append("- Not recorded in the checkpoint")
    if split:
        lines.append("- Images: " + ", ".join(f"{s} {len(split.get(s) or [])}" for s in ("train", "val", "test")))
    return "\n".join(lines)


def _settings(best: dict) -> str:
    cfg = best.get("config") or {}
    skip = TASK_SETTINGS - wording(best.get("task")).card_settings
    rows = [f"| {k} | {cfg[k]} |" for k in SETTINGS if k in cfg and k not in skip and cfg[k] is not None]
    text = "## Settings\n\n| setting | value |\n|---|---|\n" + "\n".join(rows) if rows else ""
    if best.get("start"):  # where each part of the model started from
        starts = "\n".join(f"| {part} | {redact(str(source))} |" for part, source in best["start"].items())
        text += "\n\n### Starting weights\n\n| part | started from |\n|---|---|\n" + starts
    return text


def _results(best: dict, history: Sequence[dict], test: dict | None) -> str:
    task = wording(best.get("task"))
    scores = best.get("metrics") or {}
    if not any(k.startswith("val_") for k in scores):
        why = "the run has no val split (best.pt is the last epoch)" if "split" in best else "no metrics recorded"
        return f"## Results\n\nNot evaluated: {why}."
    last = next((row for row in reversed(history) if any(k.startswith("val_") for k in row)), None)
    columns = [(f"best (epoch {best.get('epoch')})", "val", scores)]
    if last is not None and last.get("epoch") != best.get("epoch"):
        columns.append((f"last evaluated (epoch {last['epoch']})", "val", last))
    if test:
        columns.append(("test (best checkpoint)", "test", test))
    what = task.card_evaluation
    table = _table(["metric", *(c[0] for c in columns)],
                   [[title, *(_num(row.get(f"{prefix}_{key}")) for _, prefix, row in columns)]
                    for key, title in task.card_metrics
                    if any(f"{prefix}_{key}" in row for _, prefix, row in columns)])
    # per class: the best epoch's val, and test where there is one
    cells = [(f"{title} ({prefix})", f"{prefix}_{key}", row) for key, title in
             task.card_per_class for prefix, row in
             [("val", scores), *([("test", test)] if test else [])]]
    per_class = _table(["class", *(c[0] for c in cells)],
                       [[name, *(_num(row.get(key + name)) for _, key, row in cells)] for name in best["classes"]])
    return f"## Results\n\nValidation ({what}):\n\n{table}\n\nPer class, at the best epoch:\n\n{per_class}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def _time(history: Sequence[dict], hardware: str | None) -> str:
    if not history and not hardware:
        return ""
    seconds = sum(float(row.get("seconds", 0)) for row in history)
    spent = f"{len(history)} epochs in {_duration(seconds)}" if history else "time not recorded"
    return f"## Training time and hardware\n\n{spent}" + (f" on {hardware}" if hardware else "") + "."


def _limits(best: dict, history: Sequence[dict], counts: dict | None, final: bool) -> str:
    cfg, split = best.get("config") or {}, best.get("split") or {}
    train, val, test = (split.get(s) or [] for s in ("train", "val", "test"))
    limits = []
    if str(cfg.get("weights", "")).lower() == "none":
        limits.append("Trained from random init (`--weights none`): expect much lower accuracy than a model "
                      "fine-tuned from pretrained weights on the same data.")
    if split and len(train) < SMALL_TRAIN_IMAGES:
        limits.append(f"Tiny dataset: {len(train)} training images. The metrics of so few images vary a lot "
                      "from run to run and say little about new images.")
    rare = {c: n for c, n in ((c, (counts or {}).get("train", {}).get(c, 0)) for c in best["classes"])
            if n < FEW_INSTANCES} if counts else {}
    if rare:
        limits.append("Classes with fewer than {} training instances: {}.".format(
            FEW_INSTANCES, ", ".join(f"{c} ({n})" for c, n in rare.items())))
    if set(train) & set(val):
        limits.append(f"{len(set(train) & set(val))} of the {len(val)} val images are also training images: "
                      "val metrics measure how well the model fits them, not how it generalises.")
    if split and not val:
        limits.append("No val split: best.pt is simply the last epoch.")
    elif split and not test:
        limits.append("No test split: the only measure is on val, which also chose the best epoch (optimistic).")
    if cfg.get("limit"):
        limits.append(f"`--limit {cfg['limit']}`: at most {cfg['limit']} images per split were used.")
    if final and history and cfg.get("epochs") and len(history) < cfg["epochs"]:
        limits.append(f"Stopped after {len(history)} of {cfg['epochs']} epochs (early stop or interruption).")
    limits += wording(best.get("task")).card_limits
    return "## Known limits\n\n" + "\n".join(f"- {s}" for s in limits) if limits else ""


def usage(checkpoint: str | os.PathLike) -> str:
    """The "How to use" section for the model file ``checkpoint``."""
    path = Path(checkpoint).as_posix()
    return (f"## How to use\n\n```python\nfrom segkit import Predictor\n\n"
            f"predictor = Predictor.from_checkpoint(\"{path}\")\nprediction = predictor(\"photo.jpg\")"
            f"  # boxes, class_names, scores, masks\n```\n\n```\n"
            f"segkit predict photos/ --checkpoint {path} --out preds/   # overlays, masks, COCO and Label Studio json\n"
            f"segkit evaluate --checkpoint {path} --split val\n"
            f"python demo.py --checkpoint {path}                         # in a browser\n```")


def export_card_path(artifact: str | os.PathLike) -> Path:
    """Where ``segkit export`` writes the card of ``artifact``: ``model.onnx`` -> ``model.MODEL_CARD.md``."""
    artifact = Path(artifact)
    return artifact.with_name(f"{artifact.stem}.{CARD_NAME}")


def write_export_card(checkpoint: str | os.PathLike, artifact: str | os.PathLike, info: dict[str, Any],
                      ap: dict[str, float] | None, measured: str) -> Path:
    """The card of an exported model, beside it: the run's MODEL_CARD.md when ``checkpoint`` is a run's
    best.pt that has one (else a card made from the checkpoint alone), then a section on the export with
    its own ``ap`` (``box_ap``, ``mask_ap``; None when not measured) and ``measured``, saying on what."""
    checkpoint, artifact = Path(checkpoint), Path(artifact)
    run_card = checkpoint.with_name(CARD_NAME)
    if checkpoint.name == "best.pt" and run_card.is_file():
        base = run_card.read_text()
    else:
        base = render_model_card(load_checkpoint(checkpoint), checkpoint, final=True)
    return atomic_write(export_card_path(artifact), base.rstrip("\n") + "\n\n" +
                        _export_section(artifact, info, ap, measured))


def _export_section(artifact: Path, info: dict[str, Any], ap: dict[str, float] | None, measured: str) -> str:
    export = info["export"]
    frozen = ", ".join(f"{k}={v}" for k, v in export.get("frozen", {}).items())
    scores = info.get("metrics") or {}
    source = (f" (the checkpoint: mask AP {_num(scores.get('val_segm_map'))}, box AP "
              f"{_num(scores.get('val_bbox_map'))} on val at epoch {info.get('epoch')})" if scores else "")
    result = (f"box AP {_num(ap['box_ap'])}, mask AP {_num(ap['mask_ap'])}: {measured}{source}" if ap else
              f"{measured}{source}")
    return (f"## This export: {artifact.name}\n\n"
            f"- {export['format']} model written by segkit {export.get('segkit_version', '?')} from "
            f"`{export.get('source_checkpoint')}` (SHA-256 {str(export.get('source_sha256', '?'))[:16]}...)\n"
            f"- Frozen in the graph: {frozen}\n- Its own AP: {result}\n"
            + ("- Runs in bfloat16 where the CPU has it (detections differ from f32)\n" if export.get("bf16") else "")
            + "\n" + usage(artifact).replace("## How to use", "### How to use this file"))


def redact(text: str) -> str:
    """A URL without user:password, query or fragment (where keys and signatures hide); paths unchanged."""
    return redact_url(text) if "://" in text else text


def _num(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.3f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _cpu_name() -> str:
    try:  # Linux names the model; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version() -> str:
    return __version__
