"""Serving: the Label Studio ML backend, interactive prompts, pre-labelling a project,
and Hugging Face Space folders. The demo app is ``demo.py`` at the top of the repository."""
