"""segkit predict under torchrun: ranks share the images, rank 0's merged json equals one process's byte for byte,
and a run with a rank killed outright resumes, with another number of ranks, without predicting an image twice."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segkit.atomic import is_temp_name
from tests.helpers import SAMPLE

# Random-init model, 10 detection slots at threshold 0.05 (see test_predict_command): real instances to compare.
ARGS = ["--max-detections", "10", "--score-threshold", "0.05", "--batch-size", "1", "--threads", "1"]
N_IMAGES = 12


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _predict_cmd(checkpoint: Path, images: Path, out: Path, nproc: int | None) -> list[str]:
    predict = ["predict", *ARGS, "--checkpoint", str(checkpoint), "--out", str(out), str(images)]
    if nproc is None:
        return [sys.executable, "-m", "segkit", *predict]
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", f"--nproc-per-node={nproc}", "-m", "segkit", *predict]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """12 sample images, 4 of them in a sub-folder (walk order: the top folder's files first)."""
    root = tmp_path_factory.mktemp("images") / "photos"
    (root / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((SAMPLE / "val" / "images").iterdir())[:N_IMAGES]):
        shutil.copy(src, (root / "sub" if i % 3 == 0 else root) / src.name)
    return root


@pytest.fixture(scope="module")
def one_process(untrained_checkpoint, images, tmp_path_factory) -> Path:
    """The reference: one process, one thread."""
    out = tmp_path_factory.mktemp("one") / "out"
    _run(_predict_cmd(untrained_checkpoint, images, out, None))
    return out


def _same_outputs(out: Path, reference: Path) -> None:
    for name in ("predictions.json", "labelstudio.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    for sub in ("masks", "overlays"):
        # A rank killed mid-write leaves its temporary file; a later write there removes it once stale.
        names = sorted(p.name for p in (out / sub).iterdir() if not is_temp_name(p.name))
        assert names == sorted(p.name for p in (reference / sub).iterdir())
        for p in (reference / sub).iterdir():
            assert (out / sub / p.name).read_bytes() == p.read_bytes(), p.name


def test_two_ranks_write_what_one_process_writes(untrained_checkpoint, images, one_process, tmp_path):
    out = tmp_path / "out"
    done = _run(_predict_cmd(untrained_checkpoint, images, out, 2))
    assert "rank 0 of 2: predicted 6 images" in done.stdout and "rank 1 of 2: predicted 6 images" in done.stdout
    assert done.stdout.count(f"{N_IMAGES} images, ") == 1  # rank 0 alone merges and reports
    _same_outputs(out, one_process)


def _rank_pids(torchrun_pid: int) -> list[int]:
    """torchrun's worker processes: the children of its agent process."""
    children = []
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


def test_killed_rank_resumes_with_other_ranks_without_predicting_twice(untrained_checkpoint, images, one_process,
                                                                      tmp_path):
    out = tmp_path / "out"
    run = subprocess.Popen(_predict_cmd(untrained_checkpoint, images, out, 2), env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "records").glob("*.json")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        ranks = _rank_pids(run.pid)
        assert len(ranks) == 2, "the ranks finished or never started before a record appeared"
        os.kill(ranks[1], signal.SIGKILL)  # no cleanup runs: what a crash or the OOM killer leaves
        log, _ = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode != 0, log[-2000:]  # torchrun saw its rank die and stopped the other
    assert not (out / "predictions.json").exists()  # nobody merged
    done_before = {p.name: p.stat().st_ino for p in (out / "records").glob("*.json")}
    assert 0 < len(done_before) < N_IMAGES, "the kill came too late to leave work for the re-run"

    rerun = _run(_predict_cmd(untrained_checkpoint, images, out, 3))
    assert f"{len(done_before)} of {N_IMAGES} images already done" in rerun.stdout
    predicted = sum(int(line.split("predicted ")[1].split()[0]) for line in rerun.stdout.splitlines()
                    if " of 3: predicted " in line)
    assert predicted == N_IMAGES - len(done_before), rerun.stdout  # the re-run predicted exactly the images left
    # A record is replaced by a rename when its image is predicted: the same inode means nobody did it again.
    assert {name: (out / "records" / name).stat().st_ino for name in done_before} == done_before
    _same_outputs(out, one_process)


def test_a_mobile_model_on_two_ranks_writes_what_one_process_writes(untrained_mobile_checkpoint, images, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_predict_cmd(untrained_mobile_checkpoint, images, one, None))
    _run(_predict_cmd(untrained_mobile_checkpoint, images, two, 2))
    _same_outputs(two, one)
    assert json.loads((one / "predictions.json").read_text())["annotations"]  # there was something to compare
