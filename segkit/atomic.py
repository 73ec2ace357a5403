"""Atomic file writes: every file segkit writes appears whole or not at all.

A crash, Ctrl-C or full disk mid-write must never leave a half-written checkpoint, metrics.csv or
predictions.json that a later run (resume, ``segkit predict``'s skip of finished images) would trust.
The recipe is the usual one: write a temporary file in the same folder (same file system, so the
rename is atomic), fsync it, then rename it over the target.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it is fsynced and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` keeps its previous contents.
    ``mode`` is ``"wb"`` or ``"w"`` (text; ``kwargs`` go to ``open``, e.g. ``newline=""``).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp makes 0600; others (a web server, a colleague) may read it
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_file_mode() -> int:
    """What open() would give a new file: 0666 less the process's umask (which can only be read by setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; return the path."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """``obj`` as JSON, atomically; compact unless ``indent`` is given."""
    separators = None if indent is not None else (",", ":")
    return atomic_write(path, json.dumps(obj, indent=indent, separators=separators))
