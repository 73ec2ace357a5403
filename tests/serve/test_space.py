"""``segkit space``: the folder is installed as its Dockerfile installs it and serves segmented images.

A full install pulls torch (gigabytes), so the tests' fresh venv takes its base packages from this
venv's site-packages through a .pth file, without segkit: ``pip install --no-index -r requirements.txt``
in the Space's folder then proves the pins agree with what segkit is tested with and installs segkit
from the folder's wheel, and ``python app.py`` runs from the folder, importing nothing from this checkout.
The model is the random-init checkpoint: its scores reach ~0.9, so a low threshold draws masks.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segkit.cli import main
from tests.helpers import REPO, SAMPLE, free_port

pytestmark = pytest.mark.usefixtures("gradio_client_downloads")  # conftest: gradio_client's temp folders

BOOT_TIMEOUT = 180  # seconds: importing torch and gradio (and compiling an OpenVINO model) on a busy 2-core machine
THRESHOLD = 0.1
EXAMPLE = sorted((SAMPLE / "val" / "images").iterdir())[0]



def fresh_venv(root: Path) -> Path:
    """A venv whose base packages are this venv's, less segkit (linked, not copied); its python."""
    base = root / "base"
    base.mkdir(parents=True)
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not (entry.name.startswith("segkit") or "segkit" in entry.name and entry.name.startswith("__editable__")):
            (base / entry.name).symlink_to(entry)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "base.pth").write_text(f"{base}\n")  # appended to sys.path after the venv's own packages
    return python


def install(python: Path, space: Path) -> None:
    """What the Space's Dockerfile does, offline: pip install -r requirements.txt in the folder."""
    done = subprocess.run([python, "-m", "pip", "install", "--no-index", "-r", "requirements.txt"], cwd=space,
                          capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    where = subprocess.run([python, "-c", "import segkit; print(segkit.__file__)"], cwd=space, capture_output=True,
                           text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(python.parent.parent), f"segkit comes from {where}, not the Space's wheel"


@contextlib.contextmanager
def serve(python: Path, space: Path, log: Path):
    """``python app.py`` in the Space's folder on a free port; yields its URL once it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SEGKIT_CHECKPOINT", "PYTHONPATH")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", HTTPS_PROXY="http://127.0.0.1:9",
               NO_PROXY="127.0.0.1,localhost")
    url = f"http://127.0.0.1:{port}/"
    with open(log, "w") as out:
        proc = subprocess.Popen([python, "app.py", "--port", str(port)], cwd=space, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + BOOT_TIMEOUT
            while True:
                assert proc.poll() is None, f"app.py exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"app.py did not answer in {BOOT_TIMEOUT} s:\n{log.read_text()}"
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(url, timeout=5)
                    break
                time.sleep(1)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def segment(url: str, image: Path) -> tuple[Image.Image, list]:
    from gradio_client import Client, handle_file

    overlay, table, files = Client(url, verbose=False).predict(handle_file(str(image)), THRESHOLD, api_name="/segment")
    assert len(files) == 3
    return Image.open(overlay).convert("RGB"), table["data"]


def assert_segmented(overlay: Image.Image, rows: list, image: Path) -> None:
    """The answer is the image with masks drawn: its size, changed where instances were found only."""
    original = Image.open(image).convert("RGB")
    assert overlay.size == original.size
    assert rows, "no instance found at this threshold"
    changed = (np.asarray(overlay).astype(int) - np.asarray(original)).any(axis=-1)
    assert 0 < changed.mean() < 1


def build(argv: list[str], capsys) -> str:
    assert main(["space", *argv]) == 0
    return capsys.readouterr().out


def test_checkpoint_space_installs_from_its_requirements_and_serves_segmentations(untrained_checkpoint, tmp_path, capsys):
    run = tmp_path / "runs" / "exp"
    run.mkdir(parents=True)
    (run / "best.pt").symlink_to(untrained_checkpoint)
    (run / "MODEL_CARD.md").write_text("---\nlicense: mit\n---\n# Pebbles model\n\nclasses: leaf, pebble, shell\n")
    space = tmp_path / "space"
    out = build([str(run / "best.pt"), "--out", str(space), "--space", "me/pebbles",
                 "--examples", str(SAMPLE / "val" / "images")], capsys)

    assert "hf repos create me/pebbles --type space --sdk docker" in out
    assert "git push -u origin main" in out and "https://huggingface.co/spaces/me/pebbles" in out
    readme = (space / "README.md").read_text()
    config = yaml.safe_load(readme.split("---\n")[1])
    assert config["sdk"] == "docker" and config["app_port"] == 7860 and config["title"] == "pebbles"
    assert "\n# Pebbles model\n\nclasses: leaf, pebble, shell\n" in readme and "license: mit" not in readme  # the run's card
    assert 'Client("me/pebbles").predict(' in readme
    assert len(list((space / "examples").iterdir())) == 4
    # The pins are the repository's, one prediction path: segkit's demo, unchanged
    reqs = (space / "requirements.txt").read_text().splitlines()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in reqs
    assert [r for r in reqs if r.startswith("./segkit-")] == [f"./{w.name}" for w in space.glob("segkit-*.whl")]
    pins = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert set(filter(None, pins)) <= set(reqs)
    assert (space / "segkit_demo.py").read_bytes() == (REPO / "demo.py").read_bytes()
    assert "COPY --chown=user requirements.txt segkit-" in (space / "Dockerfile").read_text()
    _assert_lfs(space, ["model/best.pt", "examples/" + next((space / "examples").iterdir()).name,
                        next(space.glob("*.whl")).name], ["app.py", "requirements.txt"])

    python = fresh_venv(tmp_path / "env")
    install(python, space)
    with serve(python, space, tmp_path / "app.log") as url:
        overlay, rows = segment(url, EXAMPLE)
    assert_segmented(overlay, rows, EXAMPLE)
    assert "space/model/best.pt" in (tmp_path / "app.log").read_text()  # the folder's model, nothing else


def test_openvino_space_serves_the_exported_model(untrained_checkpoint, tmp_path, capsys):
    space = tmp_path / "space"
    build([str(untrained_checkpoint), "--out", str(space), "--format", "openvino"], capsys)

    assert sorted(p.name for p in (space / "model").iterdir()) == ["model.bin", "model.xml"]
    reqs = (space / "requirements.txt").read_text().splitlines()
    openvino = [r for r in reqs if r.startswith("openvino==")]
    assert openvino and openvino[0] in (REPO / "requirements-test.txt").read_text()
    card = (space / "README.md").read_text()
    assert "## This export: model.xml" in card and "`leaf`, `pebble`, `shell`" in card  # segkit export's card
    assert not list(space.glob("**/*MODEL_CARD.md"))
    _assert_lfs(space, ["model/model.bin", "model/model.xml"], [])

    python = fresh_venv(tmp_path / "env")
    install(python, space)
    with serve(python, space, tmp_path / "app.log") as url:
        overlay, rows = segment(url, EXAMPLE)
    assert_segmented(overlay, rows, EXAMPLE)
    assert "model/model.xml" in (tmp_path / "app.log").read_text()


def test_an_exported_model_or_a_missing_checkpoint_is_refused(tmp_path, capsys):
    fake = tmp_path / "model.xml"
    fake.write_text("<net/>")
    assert main(["space", str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "a")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["space", str(fake), "--out", str(tmp_path / "b")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def _assert_lfs(space: Path, lfs: list[str], plain: list[str]) -> None:
    """Git itself, reading the folder's .gitattributes, puts ``lfs`` in LFS and leaves ``plain`` alone."""
    subprocess.run(["git", "init", "-q", str(space)], check=True)
    for name, expected in [*((n, "lfs") for n in lfs), *((n, "unspecified") for n in plain)]:
        got = subprocess.run(["git", "check-attr", "filter", "--", name], cwd=space, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert got.endswith(f": filter: {expected}"), got
