"""Segment an image in the browser with a segkit checkpoint.

    python demo.py --checkpoint runs/exp/best.pt      # or SEGKIT_CHECKPOINT=...; hf://owner/repo/file.pt works
    python demo.py                                    # newest runs/*/best.pt, else COCO Mask R-CNN, else a help page

API: ``Client(url).predict(handle_file("photo.jpg"), 0.5, api_name="/segment")`` returns
(overlay PNG, detections table, [overlay PNG, instance-id PNG, COCO json]). A semantic checkpoint
(``--task semantic``) answers the same call with (overlay PNG, a table of the classes present with their
pixel area and share, [overlay PNG, class-index PNG, COCO json with one region per class]); it has no
scores to threshold, so the threshold is accepted and ignored.

In Python, ``predict(image, threshold)`` below is the whole model side. Importing this file loads
no model and downloads nothing: the model loads when the app is built, which happens on
``python demo.py`` or on first access to the module-level ``demo`` (what Hugging Face Spaces and
``gradio demo.py`` look up).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import collections
import functools
import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pandas as pd
from huggingface_hub import hf_hub_download
from PIL import Image

from segkit.atomic import write_json
from segkit.models.checkpoint import CheckpointError
from segkit.engine.coco import image_entry, predictions_file
from segkit.data.images import DEFAULT_MAX_PIXELS, ImageError, ImageTooLargeError, as_rgb, downscale, image_files, load_image
from segkit.inference.prediction import Prediction, SemanticPrediction
from segkit.inference.predictor import Predictor, SemanticPredictor
from segkit.engine.runs import newest_best
from segkit.inference.visualize import mask_png, overlay, save_png

MAX_SIDE = 2048  # larger images are downscaled before inference: the overlay is sent to a browser
EXAMPLES_DIR = "data/sample/val/images"
ALPHA = 0.5  # default mask opacity; the API always uses it
TABLE_COLUMNS = ["id", "class", "score", "x1", "y1", "x2", "y2", "area (px)"]
CLASS_TABLE_COLUMNS = ["class", "area (px)", "share (%)", "confidence"]  # a semantic model's table
TRAIN_HELP = """\
## No model to serve yet

Train one on your annotations, then start the demo again; it picks up the newest `runs/*/best.pt`:

```
make train                                   # the embedded sample, COCO-pretrained start
python train.py --data path/to/your/export   # your Label Studio / labelme export
python demo.py --checkpoint runs/<name>/best.pt
```
"""


def find_checkpoint(spec: str | None = None) -> str | None:
    """The checkpoint to serve: ``spec``, else $SEGKIT_CHECKPOINT, else the newest runs/*/best.pt, else None."""
    spec = spec or os.environ.get("SEGKIT_CHECKPOINT")
    if spec:
        return spec
    newest = newest_best("runs")
    return str(newest) if newest else None


def resolve_checkpoint(spec: str) -> Path:
    """A local path for ``spec``; ``hf://owner/repo/path/file.pt`` is downloaded from the Hugging Face Hub."""
    if not spec.startswith("hf://"):
        return Path(spec)
    parts = spec.removeprefix("hf://").split("/")
    if len(parts) < 3 or not all(parts):
        raise CheckpointError(f"{spec}: expected hf://owner/repo/path/to/file.pt")
    try:
        return Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))
    except Exception as e:  # noqa: BLE001 - offline, 404, gated repo: all mean "cannot get it"
        raise CheckpointError(f"{spec}: download failed ({type(e).__name__}: {e})") from e


def load_predictor(spec: str | None, max_detections: int | None = None) -> tuple[Predictor | None, str]:
    """(predictor, note): the checkpoint's model, or COCO Mask R-CNN when no checkpoint is given.

    The predictor is None when nothing could be loaded; the note then says why.
    """
    if spec:
        try:
            return Predictor.from_checkpoint(resolve_checkpoint(spec), max_detections=max_detections), ""
        except CheckpointError as e:
            return None, f"Could not load the checkpoint: {e}"
    try:
        return Predictor.from_torchvision_coco(max_detections=max_detections), "No checkpoint given: showing torchvision's COCO-pretrained Mask R-CNN."
    except Exception as e:  # noqa: BLE001 - download errors come in many types
        return None, f"No checkpoint found in runs/*/best.pt, and COCO weights are unavailable ({type(e).__name__})."


def find_examples(folder: str | os.PathLike = EXAMPLES_DIR, limit: int = 4) -> list[str]:
    """Up to ``limit`` example images from ``folder`` (none when it does not exist)."""
    return [str(p) for p in image_files(folder)[:limit]]


@functools.cache
def default_predictor() -> tuple[Predictor | None, str]:
    """The model :func:`predict` uses when given none: $SEGKIT_CHECKPOINT, else the newest runs/*/best.pt,
    else COCO Mask R-CNN; loaded on first call, then kept."""
    return load_predictor(find_checkpoint())


def predict(image: Image.Image, threshold: float = 0.5, predictor: Predictor | None = None,
            max_side: int = MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, Prediction]:
    """The instances in ``image`` scoring at least ``threshold``, and the image with them drawn.

    ``predictor`` defaults to :func:`default_predictor`; a ValueError says why when there is no model.
    Images over ``max_side`` are downscaled first, as in the app; the overlay has the downscaled size.
    Images over ``max_pixels`` are refused (ImageTooLargeError), as in the app.
    """
    if predictor is None:
        predictor, note = default_predictor()
        if predictor is None:
            raise ValueError(note)
    image = downscale(as_rgb(image, max_pixels), max_side)
    return render(image, predictor(image, score_threshold=threshold), threshold)


def render(image: Image.Image, prediction: Prediction | SemanticPrediction, threshold: float,
           classes: list[str] | None = None,
           alpha: float = ALPHA) -> tuple[Image.Image, Prediction | SemanticPrediction]:
    """The instances of ``prediction`` scoring at least ``threshold`` (of ``classes``, when given), drawn on ``image``.

    A semantic prediction has no scores: all its classes (of ``classes``) are drawn.
    """
    if isinstance(prediction, SemanticPrediction):
        shown = prediction if classes is None else prediction.keep_classes(classes)
        return overlay(image, shown, alpha=alpha), shown
    keep = prediction.scores >= threshold
    if classes is not None:
        keep &= np.array([c in classes for c in prediction.class_names], dtype=bool)
    shown = prediction.filter(keep)
    return overlay(image, shown, alpha=alpha), shown


def detections_table(prediction: Prediction | SemanticPrediction) -> pd.DataFrame:
    """One row per instance: id (as in the instance PNG), class, score, xyxy box, mask area.

    For a semantic prediction, one row per class present: its pixels, their share of the image (%) and
    the model's mean confidence on them, largest first.
    """
    if isinstance(prediction, SemanticPrediction):
        total = prediction.class_map.size
        rows = sorted([[name, int(area), round(100 * area / total, 2), round(float(score), 3)]
                       for name, area, score in zip(prediction.class_names, prediction.areas(), prediction.scores)],
                      key=lambda r: -r[1])
        return pd.DataFrame(rows, columns=CLASS_TABLE_COLUMNS)
    areas = prediction.areas()
    rows = [[i + 1, name, round(float(score), 3), *(round(float(v), 1) for v in box), int(area)]
            for i, (name, score, box, area) in enumerate(zip(prediction.class_names, prediction.scores,
                                                              prediction.boxes, areas))]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def coco_json(prediction: Prediction | SemanticPrediction, classes: list[str], file_name: str) -> dict:
    """A COCO file for one image, as ``segkit predict`` writes; annotation ``id`` i is pixel value i of the instance PNG
    (for a semantic prediction: one annotation per class present)."""
    if isinstance(prediction, SemanticPrediction):
        prediction = prediction.as_instances()
    width, height = prediction.image_size
    return predictions_file([image_entry(file_name, width, height, prediction)], classes)


class _OutputFiles:
    """Per-request folders for the downloads; only the newest ``keep`` survive (Gradio copies them on return)."""

    def __init__(self, keep: int = 32):
        self.root = Path(tempfile.mkdtemp(prefix="segkit-demo-"))
        self.recent: collections.deque[Path] = collections.deque()
        self.keep = keep

    def new_folder(self) -> Path:
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        self.recent.append(folder)
        while len(self.recent) > self.keep:
            shutil.rmtree(self.recent.popleft(), ignore_errors=True)
        return folder


def _upload_path(payload, scratch: _OutputFiles) -> tuple[str, str]:
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


def _threshold(value) -> float:
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"The score threshold must be a number, got {value!r}.") from None
    if not 0.0 <= threshold <= 1.0:
        raise gr.Error(f"The score threshold must be between 0 and 1, got {threshold}.")
    return threshold


def _friendly(error: ImageError, path: str, name: str) -> str:
    reason = str(error).replace(f"{path}: ", "").replace(path, name)
    if isinstance(error, ImageTooLargeError):
        return f"{name} is too large: {reason}. Downscale it and try again."
    return f"Could not read {name}: {reason}."


def _model_panel(predictor: Predictor) -> str:
    info = predictor.info
    facts = [f"**{k}**: `{info[k]}`" for k in ("checkpoint", "task", "arch", "mask_head", "img_size", "epoch")
             if info.get(k) is not None]
    return "  \n".join([*facts, f"**classes** ({len(predictor.classes)}): {', '.join(predictor.classes)}"])


def build_demo(predictor: Predictor | None, examples: list[str], note: str = "",
               max_side: int = MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS) -> gr.Blocks:
    """The app: an image in, its instances out; without a predictor, a page on how to train one."""
    if predictor is None:
        with gr.Blocks(title="segkit") as demo:
            gr.Markdown(TRAIN_HELP + (f"\n{note}\n" if note else ""))
        return demo

    scratch = _OutputFiles()  # the downloads, and uploads that came as data URLs
    semantic = isinstance(predictor, SemanticPredictor)

    # The model's time does not depend on the threshold (torchvision pastes every mask it keeps), so
    # predict once with no threshold and cache it: redraws for a new threshold, class filter or
    # opacity are then instant. Two entries: masks are kept at their boxes' size, the images dominate.
    @functools.lru_cache(maxsize=2)
    def predict_all(path: str, stamp: tuple[int, int]) -> tuple[Image.Image, Prediction]:
        image = load_image(path, max_side, max_pixels=max_pixels)
        return image, predictor(image, score_threshold=0.0)

    def segment(payload, threshold, classes=None, alpha=ALPHA):
        path, name = _upload_path(payload, scratch)
        threshold = _threshold(threshold)
        try:
            stat = os.stat(path)
            image, prediction = predict_all(path, (stat.st_mtime_ns, stat.st_size))
        except ImageError as e:
            raise gr.Error(_friendly(e, path, name)) from None
        except FileNotFoundError:
            raise gr.Error("The uploaded file is gone; upload it again.") from None
        drawn, shown = render(image, prediction, threshold, classes, float(alpha))
        folder, stem = scratch.new_folder(), Path(name).stem or "image"
        files = [save_png(drawn, folder / f"{stem}_overlay.png"),
                 save_png(mask_png(shown), folder / f"{stem}_{'classes' if semantic else 'instances'}.png"),
                 write_json(folder / f"{stem}_coco.json", coco_json(shown, predictor.classes, name))]
        return drawn, detections_table(shown), [str(f) for f in files]

    def segment_api(image, threshold):
        """Segment an image: returns the overlay, a detections table and the download files."""
        return segment(image, threshold)

    def redraw(image, threshold, classes, alpha):
        if image is None:  # nothing to redraw yet
            return gr.skip(), gr.skip(), gr.skip()
        return segment(image, threshold, classes, alpha)

    # delete_cache: every hour Gradio deletes the uploads and results it cached over an hour ago, so a
    # long-running server (a Space) does not fill its disk.
    with gr.Blocks(title="segkit", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# segkit: {'semantic' if semantic else 'instance'} segmentation\n"
                    f"Upload, photograph or paste an image. Images over {max_side} px are downscaled. {note}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                                 elem_id="image")
                threshold = gr.Slider(0.0, 1.0, value=predictor.score_threshold, step=0.01,
                                      label="Score threshold", elem_id="threshold", visible=not semantic)
                opacity = gr.Slider(0.0, 1.0, value=ALPHA, step=0.05, label="Mask opacity")
                with gr.Accordion("Classes to show", open=len(predictor.classes) <= 12):
                    classes = gr.CheckboxGroup(predictor.classes, value=predictor.classes, show_label=False)
                run = gr.Button("Segment", variant="primary", elem_id="run")
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[image], label="Examples")
            with gr.Column():
                drawn = gr.Image(label="Overlay", type="pil", format="png", interactive=False, elem_id="overlay")
                files = gr.File(label=f"Downloads: overlay, {'class indices' if semantic else 'instance ids'} (PNG), "
                                      "COCO json", file_count="multiple")
        table = gr.Dataframe(headers=CLASS_TABLE_COLUMNS if semantic else TABLE_COLUMNS,
                             label="Classes" if semantic else "Detections", interactive=False, max_height=400)
        with gr.Accordion("Model", open=False):
            gr.Markdown(_model_panel(predictor))
            if predictor.info.get("metrics"):
                gr.JSON(predictor.info["metrics"], label="Validation metrics of this checkpoint")

        outputs = [drawn, table, files]
        # One model run at a time (concurrency_id): the CPU or GPU is already saturated by one.
        common = dict(outputs=outputs, preprocess=False, concurrency_id="model")
        run.click(segment, [image, threshold, classes, opacity], api_name="segment_ui", api_visibility="private",
                  **common)
        gr.on([threshold.release, classes.change, opacity.release], redraw, [image, threshold, classes, opacity],
              api_name="redraw", api_visibility="private", show_progress="minimal", **common)
        # The API keeps to (image, threshold): an endpoint with no UI trigger, all classes, default opacity.
        gr.on([], segment_api, [image, threshold], api_name="segment", **common)
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve a segkit checkpoint in the browser.")
    parser.add_argument("--checkpoint", help="segkit .pt, or hf://owner/repo/path.pt "
                                             "(default: $SEGKIT_CHECKPOINT, else newest runs/*/best.pt)")
    # Hugging Face Spaces sets GRADIO_SERVER_NAME/PORT; locally the app stays on this machine.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also ask Gradio for a temporary public link")
    parser.add_argument("--examples", default=EXAMPLES_DIR, help="folder of example images")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE, help="downscale larger images to this side")
    parser.add_argument("--max-detections", type=int, default=100, help="most instances per image")
    parser.add_argument("--ls-backend", action="store_true", default=_env_flag("SEGKIT_LS_BACKEND"),
                        help="also serve Label Studio's ML-backend routes (/health, /setup, /predict, /webhook, "
                             "/versions) on the same server; default $SEGKIT_LS_BACKEND. Beyond 127.0.0.1 they need "
                             "BASIC_AUTH_USER and BASIC_AUTH_PASS, or --no-auth")
    parser.add_argument("--no-auth", action="store_true",
                        help="--ls-backend beyond 127.0.0.1 without basic auth: only on a network you trust")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse larger images (a guard against decompression bombs)")
    return parser.parse_args(argv)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def create_demo(args: argparse.Namespace) -> gr.Blocks:
    """Load the model ``args`` point to and build the app around it."""
    return create_demo_and_model(args)[0]


def create_demo_and_model(args: argparse.Namespace) -> tuple[gr.Blocks, Predictor | None]:
    """The app and the predictor it serves (None when there is no model yet)."""
    spec = find_checkpoint(args.checkpoint)
    predictor, note = load_predictor(spec, args.max_detections)
    print(f"segkit demo: {predictor.info.get('checkpoint') if predictor else 'no model'}. {note}".strip(),
          file=sys.stderr if predictor is None else sys.stdout, flush=True)
    return build_demo(predictor, find_examples(args.examples), note=note, max_side=args.max_side,
                      max_pixels=args.max_pixels), predictor


def _share_failure_reason() -> str:
    """Why Gradio gave no public link (its own message does not say); bounded to a few seconds."""
    from gradio.networking import GRADIO_API_SERVER

    try:
        httpx.get(GRADIO_API_SERVER, timeout=5).raise_for_status()
    except httpx.HTTPError as e:
        return f"{GRADIO_API_SERVER} is unreachable ({type(e).__name__}: {e})"
    return "Gradio's share server answered but the tunnel did not start (see Gradio's message above)"


def launch(demo: gr.Blocks, args: argparse.Namespace, predictor: Predictor | None = None) -> None:
    """Serve until interrupted; a failed --share leaves the local server running and says why.

    With ``--ls-backend``, settings that would open the backend to strangers stop it before anything listens.
    """
    backend = ls_backend_config(args, predictor) if args.ls_backend else None
    if backend is not None:  # SIGTERM (docker stop, a Space's restart) must end a running training too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True)
    if backend is not None:
        add_ls_backend(demo, predictor, backend)
    if args.share and not demo.share_url:
        print(f"segkit demo: no public link: {_share_failure_reason()}. Still serving on {demo.local_url}",
              flush=True)
    demo.block_thread()


def ls_backend_config(args: argparse.Namespace, predictor: Predictor | None):
    """The ML backend's settings for ``--ls-backend`` (from the environment, as for ``segkit ml-backend``);
    None when there is no checkpoint to serve. Exits when the backend would be open to strangers."""
    from segkit.serve.backend import ExposureError, backend_config, check_settings

    if predictor is None or "checkpoint" not in predictor.info or not Path(predictor.info["checkpoint"]).is_file():
        print("segkit demo: --ls-backend needs a segkit checkpoint; the backend routes are not served",
              file=sys.stderr, flush=True)
        return None
    try:
        cfg = backend_config(Path(predictor.info["checkpoint"]), os.environ, max_detections=args.max_detections,
                             max_pixels=args.max_pixels)
        check_settings(cfg, "0.0.0.0" if args.share else args.host, args.no_auth)  # a share link is public
    except ExposureError as e:
        sys.exit(f"segkit demo: {e}")
    return cfg


def add_ls_backend(demo: gr.Blocks, predictor: Predictor, cfg) -> None:
    """Serve the Label Studio ML-backend routes beside the launched app (one Space: demo and backend).

    The backend starts with the demo's predictor; a retraining it runs is served by the backend
    routes (the demo keeps its model until restarted).
    """
    from segkit.serve.backend import add_routes, create_backend

    add_routes(demo.app, create_backend(cfg, predictor), cfg.basic_auth)
    print(f"segkit demo: Label Studio ML backend at {demo.local_url.rstrip('/')} (/health, /predict, ...)", flush=True)


@functools.cache
def _module_demo() -> gr.Blocks:
    return create_demo(parse_args([]))


def __getattr__(name: str):
    # ``demo`` is built on first access, not on import: Hugging Face Spaces and `gradio demo.py` (reload
    # mode) look it up by name; its checkpoint comes from $SEGKIT_CHECKPOINT or runs/.
    if name == "demo":
        return _module_demo()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    args = parse_args()
    demo, predictor = create_demo_and_model(args)  # module level: Gradio's reload mode looks for it in __main__
    launch(demo, args, predictor)
