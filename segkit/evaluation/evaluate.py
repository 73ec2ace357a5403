"""Evaluate a :class:`segkit.inference.predictor.Predictor` (a checkpoint, or an exported model) on records:
what ``segkit evaluate``, the INT8 export's AP report and the benchmarks share. Any object with
``predict_batch`` will do, so nothing here knows the predictor's stage."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from segkit.data.images import load_image
from segkit.data.records import ImageRecord


def evaluate_predictor(predictor, records: Sequence[ImageRecord], evaluator, batch_size: int = 1,
                       show_progress: bool = True) -> dict[str, Any]:
    """Run a :class:`segkit.inference.predictor.Predictor` over ``records`` in batches, feeding every
    prediction (score threshold 0, for COCO AP) to ``evaluator`` (made over ``records``); its report."""
    evaluator.reset()
    with tqdm(total=len(records), desc="evaluate", unit="img", dynamic_ncols=True, disable=not show_progress) as bar:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            predictions = predictor.predict_batch([load_image(r.path) for r in batch], score_threshold=0.0)
            evaluator.process([{"image_id": i} for i in range(start, start + len(batch))], predictions)
            bar.update(len(batch))
    return evaluator.summarize()
