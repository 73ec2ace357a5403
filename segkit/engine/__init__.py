"""Stage 3, engine: the training run (``trainer``, with ``config``, ``loops``, ``optim``, ``seeding``,
``distributed``), evaluation (``metrics``, ``semantic_metrics``, ``coco``, ``boundary``) and what a run leaves
behind (``runs``, ``plots``, ``tracking``, ``model_card``). What differs between tasks comes from :mod:`segkit.tasks`."""
