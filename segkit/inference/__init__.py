"""Stage 4, inference: the one ``Predictor`` (eager or exported), predictions and their masks,
drawing, exported artifacts, and prediction over folders at any scale."""
