"""What each task's numbers and files are called, for people: the run's lines, the model card, the demo, ``segkit evaluate``.

Kept apart from :class:`~segkit.tasks.base.Task`, which says how a task trains, predicts and is scored, so
that a change of words touches no behaviour and a new task states both in two small places.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Wording:
    """One task's words."""

    kind: str  # the model card's first words; ``{mask_head}`` is the checkpoint's mask head
    headline: tuple[str, str]  # (metrics.csv column without the split prefix, its name) for the final summary
    curve_axes: tuple[str, str]  # metrics.png's (y label, title)
    table_label: str  # the demo's table, in a word
    mask_png_name: str  # the index PNG's suffix in file names, and in words
    mask_png_words: str
    epoch_columns: tuple[tuple[str, str], ...]  # (metrics.csv column, name) in an epoch's progress line
    # MODEL_CARD.md: (column without the split prefix, title) in the order shown, per-class (column prefix,
    # title), the task's own settings shown, how it was evaluated, its known limits
    card_metrics: tuple[tuple[str, str], ...]
    card_per_class: tuple[tuple[str, str], ...]
    card_settings: frozenset[str]
    card_evaluation: str
    card_limits: tuple[str, ...]
    evaluation_note: str  # above ``segkit evaluate``'s table: ``{threshold}``, ``{score_floor}``, ``{dilation}``
    confusion_title: str  # of its pixel confusion matrix: ``{threshold}``

    def card_kind(self, ckpt: dict[str, Any]) -> str:
        """What the checkpoint's model is, in the card's first words."""
        return self.kind.format(mask_head=ckpt.get("mask_head") or "standard")

    def epoch_summary(self, row: dict[str, float]) -> list[str]:
        """The validation part of an epoch's progress line."""
        return [f"{name} {row[column]:.3f}" for column, name in self.epoch_columns]

    def note(self, report: dict[str, Any], threshold: float, score_floor: float) -> str:
        """What ``segkit evaluate``'s numbers count."""
        dilation = (report.get("boundary") or {}).get("dilation_ratio", 0.0)
        return self.evaluation_note.format(threshold=threshold, score_floor=score_floor, dilation=dilation)


INSTANCE = Wording(
    kind="Instance segmentation (Mask R-CNN, {mask_head} mask head)",
    headline=("segm_map", "mask AP"),
    curve_axes=("AP", "validation AP"),
    table_label="Detections",
    mask_png_name="instances", mask_png_words="instance ids",
    epoch_columns=(("val_loss", "val loss"), ("val_bbox_map", "box AP"), ("val_segm_map", "mask AP"),
                   ("val_segm_map50", "mask AP50")),
    card_metrics=(("segm_map", "mask AP"), ("segm_map50", "mask AP50"), ("bbox_map", "box AP"),
                  ("miou", "mask IoU (mean over classes)"), ("biou", "Boundary IoU"), ("loss", "loss")),
    card_per_class=(("bbox_ap_", "box AP"), ("segm_ap_", "mask AP")),
    card_settings=frozenset({"mask_head", "roi_batch_size", "trainable_layers"}),
    card_evaluation="COCO AP over all detections; IoU of the masks above the score threshold",
    card_limits=(),
    evaluation_note=("COCO AP: all detections (the model's internal score threshold is {score_floor:g}); "
                     "IoU/Dice/bIoU: masks with score >= {threshold:g}; bIoU: Boundary IoU, boundary "
                     "{dilation:.0%} of the image diagonal"),
    confusion_title="pixels, masks with score >= {threshold:g}",
)

SEMANTIC = Wording(
    kind="Semantic segmentation (one class per pixel)",
    headline=("miou", "mIoU"),
    curve_axes=("score", "validation IoU, Dice, pixel accuracy"),
    table_label="Classes",
    mask_png_name="classes", mask_png_words="class indices",
    epoch_columns=(("val_loss", "val loss"), ("val_miou", "mIoU"), ("val_pixel_accuracy", "pixel acc")),
    card_metrics=(("miou", "mIoU"), ("mdice", "mDice"), ("pixel_accuracy", "pixel accuracy"), ("loss", "loss")),
    card_per_class=(("iou_", "IoU"), ("dice_", "Dice")),
    card_settings=frozenset({"loss"}),
    card_evaluation="every pixel's most probable class",
    card_limits=("Semantic model: touching objects of one class are one region; it does not count objects.",),
    evaluation_note="IoU/Dice: every pixel's most probable class against the annotations (crowd regions not judged)",
    confusion_title="pixels, semantic model",
)

WORDING: dict[str, Wording] = {"instance": INSTANCE, "semantic": SEMANTIC}


def wording(task: str | None) -> Wording:
    """The words of the task called ``task`` (None, as in checkpoints from before tasks: instance)."""
    try:
        return WORDING[task or "instance"]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(WORDING)}") from None
