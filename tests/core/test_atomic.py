"""Atomic writes: a failed or killed write leaves the previous file whole, and its leftovers go away.

New names are reached through the module (``atomic.atomic_export``), not imported, so that each test
fails on its own, not the whole file at collection, where they are missing.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import segkit.atomic as atomic
from segkit.cli import main
from segkit.models.artifacts import artifact_info
from tests.helpers import EXPORT_MAX_DETECTIONS, REPO, require_module

HOUR_AGO = time.time() - 3600


def _files(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (hidden ones too) with its bytes; a folder maps to b"<dir>"."""
    return {p.name: b"<dir>" if p.is_dir() else p.read_bytes() for p in folder.iterdir()}


def _leftover(folder: Path, target: str, age: float = HOUR_AGO, folder_kind: bool = False) -> Path:
    """A temp entry named as a segkit writer names it for ``target``, last modified at ``age``."""
    path = folder / f".{target}.k3j9x0_q{atomic.TEMP_SUFFIX}"
    if folder_kind:
        path.mkdir()
        (path / target).write_bytes(b"half")
        os.utime(path / target, (age, age))  # a folder is as recent as what was last written in it
    else:
        path.write_bytes(b"half")
    os.utime(path, (age, age))
    return path


# --- a failed write keeps the previous file --------------------------------------------------------

def _partial_then_fail(*written):
    """A stand-in for a library's save: writes half a file at each path it is given, then fails."""
    def save(obj, path, *args, **kwargs):
        for suffix in written:
            Path(path).with_suffix(suffix).write_bytes(b"half a model")
        raise OSError("No space left on device")
    return save


SAVES = {"onnx": ("onnx", "save", (".onnx",), ".onnx"),
         "openvino": ("openvino", "save_model", (".xml", ".bin"), ".xml"),
         "torchscript": ("torch.jit", "save", (".torchscript",), ".torchscript")}


@pytest.mark.parametrize("fmt", list(SAVES))
def test_failed_reexport_keeps_the_previous_export(fmt, untrained_checkpoint, exported, tmp_path, monkeypatch):
    module_name, function, written, suffix = SAVES[fmt]
    module = require_module(module_name)
    if fmt == "openvino":
        require_module("onnx")
    previous = exported(fmt)  # the same command's output, made once per session (conftest)
    shutil.copytree(previous.parent, tmp_path, dirs_exist_ok=True)
    out = tmp_path / previous.name
    command = ["export", "--checkpoint", str(untrained_checkpoint), "--format", fmt, "--out", str(out),
               "--max-detections", str(EXPORT_MAX_DETECTIONS)]
    before = _files(tmp_path)
    assert before.keys() >= {out.with_suffix(s).name for s in written}  # a whole export to keep
    monkeypatch.setattr(module, function, _partial_then_fail(*written))
    with pytest.raises(OSError, match="No space left"):
        main(command)
    assert _files(tmp_path) == before  # byte-identical, and no temp file or folder left behind
    monkeypatch.undo()
    assert artifact_info(out)["export"]["format"] == fmt


def test_atomic_export_replaces_a_set_of_files_weights_first(tmp_path, monkeypatch):
    xml, bin_ = tmp_path / "model.xml", tmp_path / "model.bin"
    xml.write_text("old graph")
    bin_.write_text("old weights")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(Path(dst).name), real_replace(src, dst)))

    def write(path: Path) -> None:
        assert path.name == "model.xml" and path.parent != tmp_path  # real name, in a temp folder
        path.write_text("new graph")
        path.with_suffix(".bin").write_text("new weights")

    assert atomic.atomic_export(xml, write, companions=[bin_]) == xml
    assert (xml.read_text(), bin_.read_text()) == ("new graph", "new weights")
    assert replaced == ["model.bin", "model.xml"]  # readers open the .xml: it must come last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]


def test_atomic_export_that_fails_leaves_nothing(tmp_path):
    xml, bin_ = tmp_path / "model.xml", tmp_path / "model.bin"
    xml.write_text("old graph")
    bin_.write_text("old weights")

    def write(path: Path) -> None:
        path.write_text("new graph")  # the .bin never comes
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_export(xml, write, companions=[bin_])
    assert _files(tmp_path) == {"model.xml": b"old graph", "model.bin": b"old weights"}
    with pytest.raises(FileNotFoundError, match="model.bin"):  # a writer that forgets a companion fails
        atomic.atomic_export(xml, lambda path: path.write_text("new graph"), companions=[bin_])
    assert _files(tmp_path) == {"model.xml": b"old graph", "model.bin": b"old weights"}


# --- leftovers of killed writers -------------------------------------------------------------------

@pytest.fixture
def sweep_every_write(monkeypatch):
    """Sweep on every write, not once a minute per folder, so a test can write twice into one folder."""
    monkeypatch.setattr(atomic, "SWEEP_EVERY_S", 0, raising=False)


def test_stale_leftovers_are_removed_by_the_next_write(tmp_path, sweep_every_write):
    stale_file = _leftover(tmp_path, "last.pt")
    stale_folder = _leftover(tmp_path, "model.xml", folder_kind=True)
    fresh = _leftover(tmp_path, "best.pt", age=time.time())  # a writer that has just begun
    busy_folder = _leftover(tmp_path, "model.onnx", folder_kind=True)
    (busy_folder / "model.onnx").write_bytes(b"being written now")  # the folder is old, its content is not
    others = [tmp_path / ".notes.tmp", tmp_path / "run.tmp", tmp_path / ".last.pt.k3j9x0_q.tmp"]
    for path in others:  # not segkit's: never touched, however old
        path.write_bytes(b"mine")
        os.utime(path, (HOUR_AGO, HOUR_AGO))
    atomic.atomic_write(tmp_path / "metrics.csv", "epoch\n1\n")
    assert not stale_file.exists() and not stale_folder.exists()
    assert fresh.exists() and busy_folder.exists() and all(path.exists() for path in others)


def test_an_old_temp_file_of_a_live_writer_is_kept(tmp_path, sweep_every_write):
    """A writer that has written nothing for an hour (a long export) still holds its lock."""
    with atomic.atomic_open(tmp_path / "slow.bin") as f:
        (temp,) = tmp_path.iterdir()
        os.utime(temp, (HOUR_AGO, HOUR_AGO))
        atomic.atomic_write(tmp_path / "other.json", "{}")
        assert temp.exists()
        f.write(b"done")
    assert (tmp_path / "slow.bin").read_bytes() == b"done"


CHILD = """
import sys, time
from segkit.atomic import atomic_open
with atomic_open(sys.argv[1]) as f:
    f.write(b"half a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


def test_leftover_of_a_killed_process_is_removed(tmp_path, sweep_every_write):
    (tmp_path / "last.pt").write_bytes(b"good")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "last.pt")], stdout=subprocess.PIPE,
                             cwd=REPO)
    try:
        assert child.stdout.readline() == b"writing\n"
        (temp,) = [p for p in tmp_path.iterdir() if p.name != "last.pt"]
        os.utime(temp, (HOUR_AGO, HOUR_AGO))  # as if it had been writing for an hour
        atomic.atomic_write(tmp_path / "metrics.csv", "")
        assert temp.exists()  # alive: its lock keeps it
    finally:
        child.send_signal(signal.SIGKILL)  # no handler runs: the temp file stays
        child.wait()
        child.stdout.close()
    assert temp.exists()
    atomic.atomic_write(tmp_path / "metrics.csv", "")
    assert not temp.exists()
    assert sorted(_files(tmp_path)) == ["last.pt", "metrics.csv"] and (tmp_path / "last.pt").read_bytes() == b"good"


def test_temp_names_are_recognized_and_stay_writable_by_libraries(tmp_path):
    """The temp file keeps atomic_open's ``.<name>.<random>`` shape; mode as a plain open gives."""
    with atomic.atomic_open(tmp_path / "best.pt") as f:
        (temp,) = tmp_path.iterdir()
        torch.save({"a": 1}, f)
    name = temp.name
    assert name.startswith(".best.pt.") and name.endswith(atomic.TEMP_SUFFIX)
    assert atomic.is_temp_name(name) and not atomic.is_temp_name("best.pt")
    mode = (tmp_path / "best.pt").stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_lock_of_a_writer_is_visible_to_another_open(tmp_path):
    """What the sweep relies on: flock conflicts between two opens of one file (true of local file systems)."""
    path = tmp_path / "f"
    path.write_bytes(b"")
    with open(path, "rb") as holder, open(path, "rb") as other:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
