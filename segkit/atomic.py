"""Atomic file writes: every file segkit writes appears whole or not at all.

A crash, Ctrl-C or full disk mid-write must never leave a half-written checkpoint, metrics.csv or
predictions.json that a later run (resume, ``segkit predict``'s skip of finished images) would trust.
The recipe is the usual one: write a temporary file in the same folder (same file system, so the
rename is atomic), fsync it, then rename it over the target. Exports, which libraries write to a path
of their own and sometimes as several files (OpenVINO's .xml and .bin), go through :func:`atomic_export`:
the library writes into a temporary folder beside the target, and the files are renamed from there.

A writer killed outright (SIGKILL, the OOM killer, a power cut) runs no cleanup and leaves its temporary
file behind, so every write first sweeps its folder of such leftovers (:func:`remove_stale_temps`).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

# Temporary files and folders are named ".<target's name>.<8 random characters>.segkit.tmp". The marker
# tells the sweep that segkit made them: another program's ".x.tmp" in the same folder is never touched.
TEMP_SUFFIX = ".segkit.tmp"
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
# A leftover is removed only when no process holds its lock AND nothing in it changed for this long.
# The lock is what protects a live writer, however long it works (the kernel frees it when the writer
# dies, even by SIGKILL; a pid in the name could be reused, or belong to another machine). The age
# covers the instant between creating a temp file and locking it, and file systems whose locks do not
# reach other machines, where a writer elsewhere, writing, keeps its file's time recent.
STALE_AFTER_S = 600
# Each folder is swept at most this often per process: segkit predict writes an overlay per image into
# one folder, and listing 100k entries on each of 100k writes would cost more than the predictions.
SWEEP_EVERY_S = 60
_last_sweep: dict[str, float] = {}


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it is fsynced and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` keeps its previous contents.
    ``mode`` is ``"wb"`` or ``"w"`` (text; ``kwargs`` go to ``open``, e.g. ``newline=""``).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    _prepare_folder(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    lock = os.dup(fd)  # holds the lock after the file object closes, until the rename is done
    _lock(lock)
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
    finally:
        os.close(lock)


def atomic_export(path: str | os.PathLike, write: Callable[[Path], None],
                  companions: Iterable[str | os.PathLike] = ()) -> Path:
    """Have ``write`` write ``path``, and ``companions`` (files it writes beside it), atomically; returns ``path``.

    ``write`` is given ``path``'s own name in a temporary folder beside ``path``, so a library that insists
    on an extension, or names one file after another (OpenVINO's .bin after its .xml), finds what it
    expects. When it returns, each file is fsynced and renamed into place, ``companions`` first: ``path``
    is what readers open, so it comes last. On an exception, or a companion that ``write`` did not make,
    the temporary folder is removed and the files in place keep their previous contents.
    """
    path = Path(path)
    files = [Path(c) for c in companions] + [path]
    if any(f.parent != path.parent for f in files):
        raise ValueError(f"{path}: its companions must be in its folder, not {[str(f) for f in files]}")
    _prepare_folder(path.parent)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX))
    lock = os.open(scratch, os.O_RDONLY)
    _lock(lock)
    try:
        write(scratch / path.name)
        for f in files:
            _fsync(scratch / f.name)  # also raises on a file ``write`` did not make, before anything moves
        for f in files:
            os.replace(scratch / f.name, f)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(lock)
    return path


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is that of a segkit temporary file or folder."""
    return _TEMP_NAME.fullmatch(name) is not None


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that killed segkit writers left in ``folder``; returns them.

    A live writer's are kept: see :data:`STALE_AFTER_S`.
    """
    try:
        names = [entry.name for entry in os.scandir(folder) if is_temp_name(entry.name)]
    except OSError:
        return []
    now = time.time()
    return [Path(folder, name) for name in names if _remove_if_stale(Path(folder, name), now)]


def _prepare_folder(folder: Path) -> None:
    """Create ``folder`` if needed, and sweep it of stale leftovers unless it was swept a moment ago."""
    folder.mkdir(parents=True, exist_ok=True)
    key, now = os.path.abspath(folder), time.monotonic()
    if key not in _last_sweep or now - _last_sweep[key] >= SWEEP_EVERY_S:
        _last_sweep[key] = now
        remove_stale_temps(folder)


def _remove_if_stale(path: Path, now: float) -> bool:
    try:
        if now - _last_change(path) < STALE_AFTER_S:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False  # gone meanwhile (another sweep, the writer's rename), or not ours to read
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False  # a live writer holds it; or this file system has no locks, and nobody can tell
    try:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    except OSError:
        return False  # another user's leftover in a shared folder: not ours to remove
    finally:
        os.close(fd)


def _last_change(path: Path) -> float:
    """When ``path``, or for a folder anything directly in it, last changed."""
    times = [os.lstat(path).st_mtime]
    if os.path.isdir(path):
        times += [entry.stat(follow_symlinks=False).st_mtime for entry in os.scandir(path)]
    return max(times)


def _lock(fd: int) -> None:
    """Mark ``fd``'s file as a live writer's until ``fd`` closes or the process ends, however it ends."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # a file system without locks: the sweep cannot lock it either, so keeps it


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_umask() -> int:
    umask = os.umask(0o022)  # it can only be read by setting it: once, at import, not under other threads
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _new_file_mode() -> int:
    """What open() would give a new file: 0666 less the process's umask (as it was when segkit was imported)."""
    return 0o666 & ~_UMASK


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; return the path."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """``obj`` as JSON, atomically; compact unless ``indent`` is given."""
    separators = None if indent is not None else (",", ":")
    return atomic_write(path, json.dumps(obj, indent=indent, separators=separators))
