"""What a prediction is, whichever model made it: :class:`~segkit.structures.prediction.Prediction` (instances,
their masks kept at box size in :mod:`segkit.structures.masks`) and the semantic class map. Below the models, so
that evaluation, tasks, inference and serving share one type without importing each other."""
