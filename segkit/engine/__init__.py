"""Stage 3, engine: the training loop (``trainer``, ``loops``), evaluation (``metrics``, ``coco``,
``boundary``, ``semantic``) and what a run leaves behind (``runs``, ``plots``, ``tracking``, ``model_card``)."""
