"""Self-describing checkpoints: written atomically, read without executing code.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so ``torch.load(weights_only=True)``
can read it and a file carrying pickled code is refused. It holds everything needed to rebuild the model
(architecture, class names, image size, score threshold), and, for ``last.pt``, to resume training.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from segkit.version import __version__
from segkit.atomic import atomic_open
from segkit.models.artifacts import ExportError, artifact_info, is_artifact, sha256


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically; a crash or Ctrl-C during the write leaves the previous file intact."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save({"segkit_version": __version__, **state}, f)
    return path


HUB_PREFIX = "hf://"  # hf://owner/repo/path/to/file.pt: a file of a Hugging Face Hub repository


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A local path for ``spec``; ``hf://owner/repo/path/file.pt`` is downloaded from the Hugging Face Hub
    (into its cache, once) and raises CheckpointError when it cannot be."""
    if not str(spec).startswith(HUB_PREFIX):
        return Path(spec)
    parts = str(spec).removeprefix(HUB_PREFIX).split("/")
    if len(parts) < 3 or not all(parts):
        raise CheckpointError(f"{spec}: expected hf://owner/repo/path/to/file.pt")
    try:
        # lazy: huggingface_hub is optional (segkit[demo]) and only hf:// specs need it
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))
    except Exception as e:  # noqa: BLE001 - not installed, offline, 404, gated repo: all mean "cannot get it"
        raise CheckpointError(f"{spec}: download failed ({type(e).__name__}: {e})") from e


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a segkit checkpoint with ``weights_only=True``; raise CheckpointError naming the file.

    An exported model (:mod:`segkit.inference.export`) gives its self-description instead: the same keys less
    the weights, plus ``export`` (format, frozen settings, source checkpoint). ``path`` is a local file: an
    ``hf://`` address is resolved once, where the user gave it (:func:`resolve_checkpoint`), and passed on.
    """
    if str(path).startswith(HUB_PREFIX):
        raise CheckpointError(f"{path}: a Hugging Face address; resolve_checkpoint() downloads it to a local file")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if is_artifact(path):
        try:
            return artifact_info(path)
        except ExportError as e:
            raise CheckpointError(str(e)) from e
        except Exception as e:  # noqa: BLE001 - each backend's parser fails in its own way
            raise CheckpointError(f"{path}: not a readable exported model ({type(e).__name__}: {e})") from e
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types
        raise CheckpointError(f"{path}: not a loadable segkit checkpoint ({type(e).__name__}: {e})."
                              " Checkpoints that carry code are refused.") from e
    missing = [k for k in ("model", "arch", "classes", "img_size") if k not in ckpt] if isinstance(ckpt, dict) else ["model"]
    if missing:
        raise CheckpointError(f"{path}: not a segkit checkpoint (missing {', '.join(missing)})")
    return ckpt


def task_of(ckpt: dict[str, Any]) -> str:
    """``"instance"`` or ``"semantic"``: what a loaded checkpoint (or exported model's description) predicts."""
    return ckpt.get("task") or "instance"


def model_version(checkpoint: str | Path) -> str:
    """``segkit-<run>-<8 hex of the file>``: the ``model_version`` of every Label Studio prediction segkit makes
    from ``checkpoint`` (ML backend, ``segkit prelabel``, ``segkit predict``'s labelstudio.json), so each sees
    the others' as current; a retrained file at the same path gets a new one."""
    path = Path(checkpoint)
    return f"segkit-{path.parent.name or path.stem}-{sha256(path)[:8]}"
