"""A trained model as a complete Hugging Face Space: ``segkit space CHECKPOINT --out DIR``.

The folder holds everything the Space runs, so ``git push`` of it is the whole deployment:

    README.md         the Space's front matter, then the model card
    Dockerfile        installs requirements.txt, runs app.py
    requirements.txt  segkit's wheel (in this folder) and its pinned dependencies, CPU torch
    segkit-*.whl      segkit itself, built from the source checkout this segkit runs from
    segkit_demo.py    segkit's demo.py, unchanged: the Gradio app and its one prediction path, ``predict``
    app.py            a few lines: the demo, serving the model below
    model/            the checkpoint, or its OpenVINO export (model.xml + model.bin)
    examples/         a few of the model's validation images, when found
    .gitattributes    the model, the wheel and the images in Git LFS

Why a Docker Space and not ``sdk: gradio``: a Gradio Space installs requirements.txt in a build step
that mounts that one file before the repository is copied in, so a wheel beside it is not there yet.
The Dockerfile copies the folder first, then runs the same ``pip install -r requirements.txt`` a user
runs locally, so what is tested here is what the Space does.

Why the demo travels as a file: the Gradio app lives in the repository's top-level ``demo.py``, not in the
segkit package (its helpers do, in :mod:`segkit.serve.demo`, and come with the wheel); shipping that file
unchanged keeps a single demo (and a single prediction path), and ``app.py`` only points it at this
folder's model.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from segkit.version import __version__
from segkit.atomic import atomic_write
from segkit.data.images import image_files
from segkit.data.splits import saved_split_images
from segkit.engine.model_card import CARD_NAME, render_model_card, write_export_card
from segkit.models.artifacts import artifact_info
from segkit.inference.export import ExportError, export
from segkit.models.checkpoint import load_checkpoint, save_checkpoint

FORMATS = ("checkpoint", "openvino")  # what the Space runs: the .pt as it is, or its OpenVINO export
MODEL_DIR = "model"
EXAMPLES_DIR = "examples"
DEMO_MODULE = "segkit_demo.py"
MAX_EXAMPLES = 4
# A CPU Space has no GPU: torch's CPU wheels skip gigabytes of CUDA libraries PyPI's torch pulls in on Linux.
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Resume-only state of last.pt: the Space needs the weights and the description, not the optimizer.
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng", "history", "step")
LFS_PATTERNS = (f"{MODEL_DIR}/**", "*.whl", f"{EXAMPLES_DIR}/**")


class SpaceError(RuntimeError):
    """A Space that cannot be written; the message says what to do."""


def build_space(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str = "checkpoint",
                space_id: str | None = None, cpu: bool = True,
                examples: str | os.PathLike | None = None) -> Path:
    """Write the Space of ``checkpoint`` into ``out`` (created, or updated in place: a Space's git clone
    keeps its history) and return ``out``.

    ``fmt`` is ``"checkpoint"`` (the .pt runs eager) or ``"openvino"`` (exported with :func:`segkit.inference.export.export`,
    for a CPU Space). ``space_id`` (``owner/name``) names the Space in its title; ``cpu`` installs torch's CPU
    wheels. ``examples`` is a folder of images to offer (default: the checkpoint's val images, when found).
    """
    if fmt not in FORMATS:
        raise SpaceError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    source = source_root()
    ckpt = load_checkpoint(checkpoint)
    if "export" in ckpt:
        raise SpaceError(f"{checkpoint} is an exported model; give the segkit checkpoint (.pt), and "
                         "--format openvino to run its OpenVINO export")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = place_model(Path(checkpoint), ckpt, out / MODEL_DIR, fmt)
    wheel = build_wheel(source, out)
    shutil.copyfile(source / "demo.py", out / DEMO_MODULE)
    model_rel = model.relative_to(out).as_posix()
    atomic_write(out / "app.py", app_source(model_rel, space_id))
    atomic_write(out / "requirements.txt", requirements(source, wheel.name, fmt, cpu))
    atomic_write(out / "Dockerfile", dockerfile(wheel.name))
    atomic_write(out / ".gitattributes", gitattributes())
    copy_examples(examples, ckpt, out / EXAMPLES_DIR)
    card = model_card(Path(checkpoint), ckpt, model, out, space_id)
    atomic_write(out / "README.md", front_matter(ckpt, space_id) + card)
    return out


def source_root() -> Path:
    """The source checkout this segkit runs from: the wheel is built from it and its demo.py is shipped."""
    root = Path(__file__).resolve().parents[2]  # segkit/serve/space.py -> the checkout
    missing = [n for n in ("pyproject.toml", "demo.py", "requirements.txt") if not (root / n).is_file()]
    if missing:
        raise SpaceError(f"segkit space builds segkit's wheel and ships its demo from a source checkout, but "
                         f"{root} has no {', '.join(missing)}; run it from a clone installed with `pip install -e .`")
    return root


def place_model(checkpoint: Path, ckpt: dict[str, Any], folder: Path, fmt: str) -> Path:
    """The model the Space serves, in ``folder`` (emptied first): the checkpoint without resume-only state,
    or its OpenVINO export."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if fmt == "openvino":
        try:
            return export(checkpoint, "openvino", folder / "model.xml")
        except ExportError as e:
            raise SpaceError(str(e)) from e
    target = folder / checkpoint.name
    if any(k in ckpt for k in RESUME_KEYS):  # last.pt: half its size is the optimizer's state
        save_checkpoint({k: v for k, v in ckpt.items() if k not in RESUME_KEYS}, target)
    else:
        shutil.copyfile(checkpoint, target)
    return target


def build_wheel(source: Path, out: Path) -> Path:
    """segkit's wheel from ``source``, placed in ``out`` (older segkit wheels there are removed).

    Built from a copy of the package files, so the checkout gets no build/ or egg-info; offline when this
    environment already has the build backend pyproject.toml asks for, else pip fetches it (build isolation).
    """
    for old in out.glob("segkit-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="segkit-wheel-") as tmp:
        tree = Path(tmp) / "src"
        shutil.copytree(source / "segkit", tree / "segkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (source / name).is_file():
                shutil.copyfile(source / name, tree / name)
        offline = ["--no-build-isolation"] if _has_build_backend(source / "pyproject.toml") else []
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", *offline, "--wheel-dir", str(out), str(tree)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(out.glob("segkit-*.whl"))
    if done.returncode != 0 or not wheels:
        raise SpaceError(f"building segkit's wheel failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return wheels[0]


def _has_build_backend(pyproject: Path) -> bool:
    """Whether every requirement of pyproject.toml's [build-system] is installed here."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return False
    for spec in tomllib.loads(pyproject.read_text())["build-system"]["requires"]:
        req = Requirement(spec)
        try:
            if not req.specifier.contains(importlib.metadata.version(req.name), prereleases=True):
                return False
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


def requirements(source: Path, wheel: str, fmt: str, cpu: bool) -> str:
    """requirements.txt: the wheel, then the pins of the source's requirements.txt (segkit's runtime
    dependencies, as tested), and OpenVINO's pin from requirements-test.txt for an OpenVINO model."""
    pins = _pins(source / "requirements.txt")
    if fmt == "openvino":
        test_pins = _pins(source / "requirements-test.txt")
        openvino = [p for p in test_pins if p.split("==")[0].strip().lower() == "openvino"]
        pins += openvino or ["openvino"]
    lines = ["# This Space's Python packages: the Dockerfile runs pip install -r requirements.txt in this folder.",
             f"# segkit {__version__} from the wheel beside this file, then its dependencies as segkit is tested."]
    if cpu:
        lines += ["# CPU wheels of torch and torchvision (the same versions, +cpu): a CPU Space has no GPU, and PyPI's",
                  "# Linux torch pulls gigabytes of CUDA libraries. Delete this line for GPU hardware.",
                  f"--extra-index-url {CPU_INDEX}"]
    return "\n".join([*lines, f"./{wheel}", *pins]) + "\n"


def _pins(path: Path) -> list[str]:
    """The requirement lines of ``path``, without comments, blank lines and ``-r`` includes."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def dockerfile(wheel: str) -> str:
    """The Space's image: the wheel and requirements first (a new model alone does not reinstall them), then the rest."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"""\
# Written by `segkit space` (segkit {__version__}). Hugging Face builds and runs this (sdk: docker).
FROM python:{version}
# Spaces run the app as user 1000.
RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user PATH=/home/user/.local/bin:$PATH PYTHONUNBUFFERED=1 \\
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 GRADIO_ANALYTICS_ENABLED=False
WORKDIR $HOME/app
COPY --chown=user requirements.txt {wheel} ./
RUN pip install --no-cache-dir -r requirements.txt
COPY --chown=user . .
EXPOSE 7860
CMD ["python", "app.py"]
"""


def app_source(model_rel: str, space_id: str | None) -> str:
    """app.py: segkit's demo (segkit_demo.py) serving the model in this folder."""
    return f'''\
"""{space_id or "This Space"}: segkit's demo serving {model_rel} (written by `segkit space`, segkit {__version__}).

The app is segkit's own demo, segkit_demo.py (segkit's demo.py, unchanged); this file only points it at
the model in this folder. `python app.py` serves it on http://127.0.0.1:7860 (the Space's Dockerfile runs
the same command); `python app.py --help` lists the demo's options. A Space variable SEGKIT_CHECKPOINT
(e.g. hf://owner/repo/best.pt) serves another model instead.
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("SEGKIT_CHECKPOINT", str(HERE / "{model_rel}"))

import segkit_demo  # noqa: E402 - reads SEGKIT_CHECKPOINT when the app is built, not on import

DEFAULT_ARGS = ["--examples", str(HERE / "{EXAMPLES_DIR}")]


def __getattr__(name: str):
    # `demo`, built on first access (what `gradio app.py` looks up), as segkit_demo does
    if name == "demo":
        return segkit_demo.demo
    raise AttributeError(f"module {{__name__!r}} has no attribute {{name!r}}")


if __name__ == "__main__":
    args = segkit_demo.parse_args(DEFAULT_ARGS + sys.argv[1:])
    demo, predictor = segkit_demo.create_demo_and_model(args)
    segkit_demo.launch(demo, args, predictor)
'''


def gitattributes() -> str:
    """Git LFS for the model, the wheel and the images: the Hub refuses binary files pushed without it."""
    return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)


def copy_examples(folder: str | os.PathLike | None, ckpt: dict[str, Any], dest: Path) -> list[Path]:
    """Up to :data:`MAX_EXAMPLES` images into ``dest`` (emptied first): from ``folder``, else the checkpoint's
    val split where its dataset is on this machine. None found is fine: the demo then shows no examples."""
    shutil.rmtree(dest, ignore_errors=True)
    found = image_files(folder)[:MAX_EXAMPLES] if folder else saved_split_images(ckpt, "val", MAX_EXAMPLES)
    if not found:
        return []
    dest.mkdir(parents=True)
    copied = []
    for i, path in enumerate(found):
        copied.append(Path(shutil.copyfile(path, dest / f"{i + 1}_{Path(path).name}")))
    return copied


def model_card(checkpoint: Path, ckpt: dict[str, Any], model: Path, out: Path, space_id: str | None) -> str:
    """The card under the Space's front matter (:mod:`segkit.engine.model_card`): the run's MODEL_CARD.md when the
    checkpoint's folder has one, else one made from the checkpoint; for an export, the card ``segkit export``
    writes (its AP is not measured here). Its own YAML block is dropped: the Space's front matter comes first."""
    model_rel = model.relative_to(out).as_posix()
    if model.suffix == ".xml":
        written = write_export_card(checkpoint, model, artifact_info(model), None,
                                    f"not measured when the Space was written (`segkit evaluate --checkpoint "
                                    f"{model_rel}` measures it on the val split)")
        text = written.read_text().replace(str(model), model_rel)  # the Space's path, not this machine's
        written.unlink()  # it goes into README.md
    elif (checkpoint.parent / CARD_NAME).is_file():
        text = (checkpoint.parent / CARD_NAME).read_text()
    else:
        text = render_model_card(ckpt, model_rel, final=True)
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        text = text[4:].split("\n---\n", 1)[1]
    return text.strip("\n") + "\n\n" + _space_section(model_rel, model.suffix == ".xml", space_id)


def _space_section(model_rel: str, openvino: bool, space_id: str | None) -> str:
    served = "its OpenVINO export, on the CPU" if openvino else "the checkpoint (eager PyTorch)"
    return (f"## This Space\n\nsegkit's demo serving `{model_rel}`: {served}. From Python:\n\n```python\n"
            f"from gradio_client import Client, handle_file\n\n"
            f'overlay, table, files = Client("{space_id or "OWNER/SPACE"}").predict(handle_file("photo.jpg"), 0.5, '
            f'api_name="/segment")\n```\n')


def front_matter(ckpt: dict[str, Any], space_id: str | None) -> str:
    """The Space's configuration (https://huggingface.co/docs/hub/spaces-config-reference), YAML before the card."""
    task = ckpt.get("task") or "instance"
    title = space_id.split("/")[-1] if space_id else f"segkit {task} segmentation"
    classes = ", ".join(ckpt["classes"])
    short = f"{task.capitalize()} segmentation: {classes}"
    short = short if len(short) <= 60 else short[:57] + "..."  # the Hub allows 60 characters
    return "\n".join(["---", f"title: {_yaml(title)}", "emoji: 🎯", "colorFrom: indigo", "colorTo: green",
                      "sdk: docker", "app_port: 7860", "pinned: false", f"short_description: {_yaml(short)}",
                      "tags:", "  - segkit", "  - image-segmentation", f"  - {task}-segmentation", "---", "", ""])


def _yaml(text: str) -> str:
    """``text`` as a YAML double-quoted string (class names may hold colons or quotes)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def push_commands(out: str | os.PathLike, space_id: str | None = None) -> list[str]:
    """The shell commands that publish the folder ``out`` as a new Space ``space_id`` (a placeholder when None)."""
    space = space_id or f"<you>/{Path(out).resolve().name}"
    return [f"cd {out}",
            "hf auth login --add-to-git-credential  # once: a write token, also for git push",
            f"hf repos create {space} --type space --sdk docker",
            "git init -b main && git lfs install --local",
            "git add -A && git commit -m 'segkit Space'",
            f"git remote add origin https://huggingface.co/spaces/{space}",
            "git push -u origin main"]
