"""Engine: the training run (``trainer``, with ``config``, ``loops``, ``optim``, ``seeding``,
``distributed``), scored by :mod:`segkit.evaluation`, and what a run leaves behind (``runs``, ``plots``, ``tracking``, ``model_card``). What differs between tasks comes from :mod:`segkit.tasks`."""
