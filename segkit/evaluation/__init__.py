"""Scoring predictions against ground truth: COCO AP (:mod:`~segkit.evaluation.coco`), per-class IoU and Dice
(:mod:`~segkit.evaluation.metrics`, :mod:`~segkit.evaluation.semantic_metrics`), boundary quality, and the loop
that runs a predictor over records (:mod:`~segkit.evaluation.evaluate`)."""
