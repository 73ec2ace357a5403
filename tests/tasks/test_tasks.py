"""segkit.tasks: every task fills in the whole Task, and their evaluators share one interface and behave alike."""
from __future__ import annotations

import numpy as np
import pytest

from segkit.data.readers import load_dataset
from segkit.structures.prediction import Prediction, SemanticPrediction
from segkit.tasks import TASKS, WORDING, Task, get_task, wording
from tests.helpers import SAMPLE

CLASSES = ["leaf", "pebble", "shell"]


def _records(n: int = 3):
    return [r for r in load_dataset(SAMPLE / "val").images if r.instances][:n]


def _truth(task: Task, record) -> Prediction | SemanticPrediction:
    """The record's annotations as the task's prediction (scores 1)."""
    if task.prediction is SemanticPrediction:
        return SemanticPrediction.from_record(record, CLASSES)
    truth = Prediction.from_record(record, CLASSES)
    truth.scores = np.ones(len(truth), np.float32)
    return truth


def _blank(task: Task, record) -> Prediction | SemanticPrediction:
    if task.prediction is SemanticPrediction:
        return SemanticPrediction(np.zeros((record.height, record.width), np.uint8), CLASSES)
    return Prediction(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), [], np.zeros(0, np.float32),
                      np.zeros((0, record.height, record.width), bool))


def _headline(task: Task, report: dict) -> float:
    """The number that picks best.pt, from an evaluator's report, as training's metrics row names it."""
    return task.metrics_row(report, "val")[task.score_key]


def test_every_task_fills_in_the_whole_interface():
    for name, task in TASKS.items():
        assert task.name == name and get_task(name) is task
        missing = [attr for attr in Task.__annotations__ if not hasattr(task, attr)]
        assert not missing, f"{name} lacks {missing}"
        assert task.default_model in task.architectures and task.region in ("polygon", "brush")
        assert task.score_key.startswith("val_") and task.prediction.TABLE_COLUMNS
    assert get_task(None) is TASKS["instance"] and wording(None) is WORDING["instance"]  # checkpoints from before tasks
    assert set(WORDING) == set(TASKS)
    with pytest.raises(ValueError, match="unknown task 'panoptic'; choose one of: instance, semantic"):
        get_task("panoptic")


@pytest.mark.parametrize("name", list(TASKS))
def test_evaluators_score_the_ground_truth_one_and_nothing_zero_and_reset(name):
    task, records = get_task(name), _records()
    evaluator = task.evaluator(records, CLASSES, 0.5, task.ground_truth(records, CLASSES))
    targets = [{"image_id": i} for i in range(len(records))]
    evaluator.process(targets, [_truth(task, r) for r in records])
    assert _headline(task, evaluator.summarize()) == pytest.approx(1.0)
    evaluator.reset()
    evaluator.process(targets[:1], [_blank(task, records[0])])  # a batch at a time: what was before is gone
    evaluator.process(targets[1:], [_blank(task, r) for r in records[1:]])
    assert _headline(task, evaluator.summarize()) == pytest.approx(0.0)
    assert evaluator.confusion.shape == (len(CLASSES) + 1,) * 2
    assert task.format_table(evaluator.summarize(), CLASSES).splitlines()[1].startswith("leaf")


@pytest.mark.parametrize("name", list(TASKS))
def test_the_words_of_each_task_name_columns_its_metrics_row_has(name):
    task, words, records = get_task(name), wording(name), _records()
    evaluator = task.evaluator(records, CLASSES, 0.5, task.ground_truth(records, CLASSES))
    evaluator.process([{"image_id": i} for i in range(len(records))], [_truth(task, r) for r in records])
    report = evaluator.summarize()
    row = {**task.metrics_row(report, "val"), "val_loss": 0.25}
    assert f"val_{words.headline[0]}" in row and task.score_key == f"val_{words.headline[0]}"
    assert [f"val_{key}" for key, _ in words.card_metrics if f"val_{key}" not in row] == []
    assert all(any(k.startswith(f"val_{prefix}") for k in row) for prefix, _ in words.card_per_class)
    assert words.epoch_summary(row)[0] == "val loss 0.250" and "1.000" in " ".join(words.epoch_summary(row))
    note = words.note(report, 0.5, 0.05)
    assert "{" not in note and "{" not in words.confusion_title.format(threshold=0.5)
    assert "{" not in words.card_kind({"mask_head": "pointrend"})


@pytest.mark.parametrize("name", list(TASKS))
def test_predictions_of_either_task_answer_the_same_questions(name):
    task, record = get_task(name), _records(1)[0]
    truth = _truth(task, record)
    shown = truth.at_least(0.5).keep_classes(["leaf"])
    assert set(shown.as_instances().class_names) <= {"leaf"}
    rows = shown.table_rows()
    assert rows and all(len(row) == len(task.prediction.TABLE_COLUMNS) for row in rows)
    assert truth.at_least(2.0).as_instances().class_names == ([] if task.has_scores else truth.class_names)
