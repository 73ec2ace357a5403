"""Inference: the one ``Predictor`` (eager or exported), drawing, export, and prediction over folders at
any scale. What a prediction is lives in :mod:`segkit.structures`."""
