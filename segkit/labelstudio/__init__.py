"""Label Studio, live: a project as a dataset (:mod:`.project`), its labeling config (:mod:`.config`),
and segkit as the project's ML backend (:mod:`.backend`), all over Label Studio's plain HTTP API.

``label-studio`` and ``label-studio-sdk`` are deliberately not dependencies: their pins clash with
segkit's, and the few calls needed here are plain ``httpx``.
"""
