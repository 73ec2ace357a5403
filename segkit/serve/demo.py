"""The parts of the Gradio demo (``demo.py``) that are not its app: what a prediction becomes, uploads, errors.

``demo.py`` is the app (find and load the model, build the Blocks and connect its events to ``predict``,
parse its arguments, launch); this module holds the rest: rendering and the detections table, the COCO json
of a prediction, the per-request folders of the downloads, uploads (paths, data URLs) and their friendly
errors, the threshold check, the reuse of one model run across redraws, the components the app lays out
(:func:`app_layout`), and the Label Studio backend served beside the app. It needs the demo's extra
(``pip install 'segkit[demo]'``: gradio).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import collections
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import uuid
import weakref
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pandas as pd
from PIL import Image

from segkit.atomic import write_json
from segkit.data.images import ImageError, ImageTooLargeError, image_files, load_image
from segkit.data.splits import saved_split_images
from segkit.evaluation.coco import image_entry, predictions_file
from segkit.structures.prediction import Prediction, SemanticPrediction
from segkit.inference.predictor import Predictor
from segkit.inference.visualize import mask_png, overlay, save_png
from segkit.models.checkpoint import CheckpointError, load_checkpoint
from segkit.serve.backend import add_routes, create_backend
from segkit.serve.settings import BackendConfig, ExposureError, config_from_args
from segkit.tasks import get_task
from segkit.tasks.wording import wording

ALPHA = 0.5  # default mask opacity; the API always uses it
EXAMPLES_DIR = "data/sample/val/images"
TABLE_COLUMNS = Prediction.TABLE_COLUMNS
CLASS_TABLE_COLUMNS = SemanticPrediction.TABLE_COLUMNS  # a semantic model's table
TRAIN_HELP = """\
## No model to serve yet

Train one on your annotations, then start the demo again; it picks up the newest `runs/*/best.pt`:

```
make train                                   # the embedded sample, COCO-pretrained start
python train.py --data path/to/your/export   # your Label Studio / labelme export
python demo.py --checkpoint runs/<name>/best.pt
```
"""


def find_examples(folder: str | os.PathLike = EXAMPLES_DIR, limit: int = 4) -> list[str]:
    """Up to ``limit`` example images from ``folder`` (none when it does not exist)."""
    return [str(p) for p in image_files(folder)[:limit]]


SAMPLE_CLASSES = frozenset({"leaf", "pebble", "shell"})  # the embedded sample's (data/sample)


def model_examples(predictor: Predictor | None, folder: str | os.PathLike | None = None, limit: int = 4) -> list[str]:
    """The examples the app offers: ``folder``'s images when given; else the model's own val images where its
    data is on this machine (a fruits model shows fruits); else the sample's for a model of the sample's classes."""
    if folder:
        return find_examples(folder, limit)
    checkpoint = (predictor.info.get("checkpoint") if predictor else None) or ""
    if Path(checkpoint).is_file():
        try:
            own = saved_split_images(load_checkpoint(checkpoint), "val", limit)
        except CheckpointError:
            own = []
        if own:
            return [str(p) for p in own]
    if predictor is not None and SAMPLE_CLASSES & set(predictor.classes):
        return find_examples(EXAMPLES_DIR, limit)
    return []


def train_help_page(note: str = "") -> gr.Blocks:
    """The app when there is no model: how to train one, and ``note`` on why none was loaded."""
    with gr.Blocks(title="segkit") as demo:
        gr.Markdown(TRAIN_HELP + (f"\n{note}\n" if note else ""))
    return demo


def render(image: Image.Image, prediction: Prediction | SemanticPrediction, threshold: float,
           classes: list[str] | None = None,
           alpha: float = ALPHA) -> tuple[Image.Image, Prediction | SemanticPrediction]:
    """What of ``prediction`` scores at least ``threshold`` (of ``classes``, when given), drawn on ``image``.

    A semantic prediction has no scores: all its classes (of ``classes``) are drawn.
    """
    shown = prediction.at_least(threshold)
    if classes is not None:
        shown = shown.keep_classes(classes)
    return overlay(image, shown, alpha=alpha), shown


def detections_table(prediction: Prediction | SemanticPrediction) -> pd.DataFrame:
    """The answer's table: one row per instance, or per class present for a semantic prediction
    (see ``table_rows`` of :class:`Prediction` and :class:`SemanticPrediction`)."""
    return pd.DataFrame(prediction.table_rows(), columns=prediction.TABLE_COLUMNS)


def coco_json(prediction: Prediction | SemanticPrediction, classes: list[str], file_name: str) -> dict:
    """A COCO file for one image, as ``segkit predict`` writes; annotation ``id`` i is pixel value i of the instance PNG
    (for a semantic prediction: one annotation per class present)."""
    regions = prediction.as_instances()
    width, height = regions.image_size
    return predictions_file([image_entry(file_name, width, height, regions)], classes)


def write_downloads(folder: Path, name: str, drawn: Image.Image, shown: Prediction | SemanticPrediction,
                    predictor: Predictor) -> list[str]:
    """The three downloads of one answer in ``folder``: overlay PNG, instance-id (or class-index) PNG, COCO json."""
    stem = Path(name).stem or "image"
    masks = wording(predictor.task).mask_png_name
    files = [save_png(drawn, folder / f"{stem}_overlay.png"), save_png(mask_png(shown), folder / f"{stem}_{masks}.png"),
             write_json(folder / f"{stem}_coco.json", coco_json(shown, predictor.classes, name))]
    return [str(f) for f in files]


class OutputFiles:
    """Per-request folders for the downloads; only the newest ``keep`` survive (Gradio copies them on return),
    and the root goes with this object: when it is collected or Python exits normally (not on SIGKILL/SIGTERM)."""

    def __init__(self, keep: int = 32):
        self.root = Path(tempfile.mkdtemp(prefix="segkit-demo-"))
        weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)
        self.recent: collections.deque[Path] = collections.deque()
        self.keep = keep

    def new_folder(self) -> Path:
        """A new empty folder; the oldest beyond ``keep`` are deleted."""
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        self.recent.append(folder)
        while len(self.recent) > self.keep:
            shutil.rmtree(self.recent.popleft(), ignore_errors=True)
        return folder


class ReusedPredictions:
    """``predictor`` run once per image, with no threshold; a call on the same image again (a new threshold,
    class filter or opacity in the app) filters that prediction instead of running the model.

    The model's time does not depend on the threshold (torchvision pastes every mask it keeps), and the
    instances over a threshold are the same whether it is applied in the model or afterwards. Two images
    are kept: masks are kept at their boxes' size, the images dominate.
    """

    def __init__(self, predictor: Predictor, keep: int = 2):
        self.predictor, self.keep = predictor, keep
        self.recent: collections.OrderedDict[tuple, Prediction | SemanticPrediction] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, image: Image.Image, score_threshold: float | None = None) -> Prediction | SemanticPrediction:
        """``predictor(image, score_threshold)``, from the kept prediction when ``image`` was seen."""
        key = (image.size, image.mode, hashlib.blake2b(image.tobytes(), digest_size=16).digest())
        with self._lock:
            prediction = self.recent.pop(key, None)
        if prediction is None:
            prediction = self.predictor(image, score_threshold=0.0)
        with self._lock:
            self.recent[key] = prediction
            while len(self.recent) > self.keep:
                self.recent.popitem(last=False)
        threshold = self.predictor.score_threshold if score_threshold is None else score_threshold
        return prediction.at_least(threshold)


def upload_path(payload: str | dict | None, scratch: OutputFiles) -> tuple[str, str]:
    """(server path, name the user gave it) of an image input; the events skip Gradio's preprocessing
    so that unreadable files reach :func:`segkit.data.images.load_image` and get a clear message."""
    if payload is None:
        raise gr.Error("No image: upload one, take one with the webcam, or paste one from the clipboard.")
    if isinstance(payload, str):
        return payload, Path(payload).name
    path, url = payload.get("path"), payload.get("url") or ""
    if path is None and url.startswith("data:"):  # a base64 image from an older client
        path = _save_data_url(url, scratch.new_folder())
    if path is None:
        raise gr.Error("No image received.")
    return path, payload.get("orig_name") or Path(path).name


def _save_data_url(url: str, folder: Path) -> str:
    try:
        data = base64.b64decode(url.split(",", 1)[1], validate=True)
    except (IndexError, binascii.Error):
        raise gr.Error("The image data could not be decoded.") from None
    path = folder / "upload"  # in a scratch folder that is pruned like the downloads
    path.write_bytes(data)
    return str(path)


def read_upload(path: str, name: str, max_side: int, max_pixels: int) -> Image.Image:
    """The uploaded image at ``path`` as the model gets it; a gr.Error in the user's words when it cannot be."""
    try:
        stat = os.stat(path)
        return _load(path, (stat.st_mtime_ns, stat.st_size), max_side, max_pixels)
    except ImageError as e:
        raise gr.Error(friendly_error(e, path, name)) from None
    except FileNotFoundError:
        raise gr.Error("The uploaded file is gone; upload it again.") from None


@functools.lru_cache(maxsize=2)
def _load(path: str, stamp: tuple[int, int], max_side: int, max_pixels: int) -> Image.Image:
    # Kept: a redraw (new threshold, classes, opacity) must not decode the upload again. ``stamp``
    # (mtime, size) tells a file replaced at the same path from the one kept.
    return load_image(path, max_side, max_pixels=max_pixels)


def parse_threshold(value: object) -> float:
    """The score threshold the user set, in [0, 1]; a gr.Error saying what is wrong otherwise."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"The score threshold must be a number, got {value!r}.") from None
    if not 0.0 <= threshold <= 1.0:
        raise gr.Error(f"The score threshold must be between 0 and 1, got {threshold}.")
    return threshold


def friendly_error(error: ImageError, path: str, name: str) -> str:
    """``error`` about the server's copy at ``path``, told about the file the user named ``name``."""
    reason = str(error).replace(f"{path}: ", "").replace(path, name)
    if isinstance(error, ImageTooLargeError):
        return f"{name} is too large: {reason}. Downscale it and try again."
    return f"Could not read {name}: {reason}."


def model_panel(predictor: Predictor) -> str:
    """Markdown facts about the served model: its checkpoint, task, architecture, size, epoch and classes."""
    info = predictor.info
    facts = [f"**{k}**: `{info[k]}`" for k in ("checkpoint", "task", "arch", "mask_head", "img_size", "epoch")
             if info.get(k) is not None]
    return "  \n".join([*facts, f"**classes** ({len(predictor.classes)}): {', '.join(predictor.classes)}"])


def app_layout(predictor: Predictor, examples: list[str], note: str, max_side: int) -> SimpleNamespace:
    """The app's components, made inside the Blocks that ``demo.build_demo`` builds, which connects them: the
    image and its controls (threshold, opacity, classes, the Segment button, examples), the overlay, the
    downloads, the table, and a panel on the model."""
    task, words = get_task(predictor.task), wording(predictor.task)
    ui = SimpleNamespace()
    gr.Markdown(f"# segkit: {task.name} segmentation\n"
                f"Upload, photograph or paste an image. Images over {max_side} px are downscaled. {note}")
    with gr.Row():
        with gr.Column():
            ui.image = gr.Image(label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                                elem_id="image")
            ui.threshold = gr.Slider(0.0, 1.0, value=predictor.score_threshold, step=0.01,
                                     label="Score threshold", elem_id="threshold", visible=task.has_scores)
            ui.opacity = gr.Slider(0.0, 1.0, value=ALPHA, step=0.05, label="Mask opacity")
            with gr.Accordion("Classes to show", open=len(predictor.classes) <= 12):
                ui.classes = gr.CheckboxGroup(predictor.classes, value=predictor.classes, show_label=False)
            ui.run = gr.Button("Segment", variant="primary", elem_id="run")
            if examples:
                gr.Examples(examples=[[p] for p in examples], inputs=[ui.image], label="Examples")
        with gr.Column():
            ui.drawn = gr.Image(label="Overlay", type="pil", format="png", interactive=False, elem_id="overlay")
            ui.files = gr.File(label=f"Downloads: overlay, {words.mask_png_words} (PNG), "
                                     "COCO json", file_count="multiple")
    ui.table = gr.Dataframe(headers=task.prediction.TABLE_COLUMNS, label=words.table_label, interactive=False,
                            max_height=400)
    with gr.Accordion("Model", open=False):
        gr.Markdown(model_panel(predictor))
        if predictor.info.get("metrics"):
            gr.JSON(predictor.info["metrics"], label="Validation metrics of this checkpoint")
    return ui


def share_failure_reason() -> str:
    """Why Gradio gave no public link (its own message does not say); bounded to a few seconds."""
    import httpx  # lazy: only a failed --share needs it
    from gradio.networking import GRADIO_API_SERVER

    try:
        httpx.get(GRADIO_API_SERVER, timeout=5).raise_for_status()
    except httpx.HTTPError as e:
        return f"{GRADIO_API_SERVER} is unreachable ({type(e).__name__}: {e})"
    return "Gradio's share server answered but the tunnel did not start (see Gradio's message above)"


def ls_backend_config(args: argparse.Namespace, predictor: Predictor | None) -> BackendConfig | None:
    """The ML backend's settings for ``--ls-backend`` (from the environment, as for ``segkit ml-backend``);
    None when there is no checkpoint to serve. Exits when the backend would be open to strangers."""
    if predictor is None or "checkpoint" not in predictor.info or not Path(predictor.info["checkpoint"]).is_file():
        print("segkit demo: --ls-backend needs a segkit checkpoint; the backend routes are not served",
              file=sys.stderr, flush=True)
        return None
    try:  # a share link is public: checked as listening on every interface
        return config_from_args(Path(predictor.info["checkpoint"]), args, os.environ,
                                host="0.0.0.0" if args.share else args.host)
    except ExposureError as e:
        sys.exit(f"segkit demo: {e}")


def add_ls_backend(demo: gr.Blocks, predictor: Predictor, cfg: BackendConfig) -> None:
    """Serve the Label Studio ML-backend routes beside the launched app (one Space: demo and backend).

    The backend starts with the demo's predictor; a retraining it runs is served by the backend
    routes (the demo keeps its model until restarted).
    """
    add_routes(demo.app, create_backend(cfg, predictor))
    print(f"segkit demo: Label Studio ML backend at {demo.local_url.rstrip('/')} (/health, /predict, ...)", flush=True)
