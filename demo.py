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
import functools
import os
import signal
import sys

import gradio as gr
from PIL import Image

from segkit.commands import add_tile_arguments, add_tta_arguments, tiling_from_args, tta_from_args
from segkit.data.images import DEFAULT_MAX_PIXELS, as_rgb, downscale
from segkit.engine.runs import newest_best
from segkit.structures.prediction import Prediction, SemanticPrediction
from segkit.inference.predictor import Predictor, UnsupportedOption
from segkit.models.checkpoint import CheckpointError
from segkit.serve.demo import (ALPHA, CLASS_TABLE_COLUMNS, EXAMPLES_DIR, OutputFiles, ReusedPredictions,  # noqa: F401
                               add_ls_backend, app_layout, detections_table, ls_backend_config, model_examples,
                               parse_threshold, read_upload, render, share_failure_reason, train_help_page, upload_path,
                               write_downloads)

MAX_SIDE = 2048  # larger images are downscaled before inference: the overlay is sent to a browser
TILED_MAX_SIDE = 10000  # ... unless they are predicted tile by tile, which is for seeing them at full size


def find_checkpoint(spec: str | None = None) -> str | None:
    """The checkpoint to serve: ``spec``, else $SEGKIT_CHECKPOINT, else the newest runs/*/best.pt, else None."""
    spec = spec or os.environ.get("SEGKIT_CHECKPOINT")
    newest = None if spec else newest_best("runs")
    return spec or (str(newest) if newest else None)


def load_predictor(spec: str | None, max_detections: int | None = None) -> tuple[Predictor | None, str]:
    """(predictor, note): the checkpoint's model (``hf://owner/repo/path.pt`` is downloaded), or COCO Mask
    R-CNN when no checkpoint is given. The predictor is None when nothing could be loaded; the note says why."""
    if spec:
        try:
            return Predictor.from_checkpoint(spec, max_detections=max_detections), ""  # it resolves hf:// once
        except CheckpointError as e:
            return None, f"Could not load the checkpoint: {e}"
    try:
        return Predictor.from_torchvision_coco(max_detections=max_detections), "No checkpoint given: showing torchvision's COCO-pretrained Mask R-CNN."
    except Exception as e:  # noqa: BLE001 - download errors come in many types
        return None, f"No checkpoint found in runs/*/best.pt, and COCO weights are unavailable ({type(e).__name__})."


@functools.cache
def default_predictor() -> tuple[Predictor | None, str]:
    """The model :func:`predict` uses when given none: $SEGKIT_CHECKPOINT, else the newest runs/*/best.pt,
    else COCO Mask R-CNN; loaded on first call, then kept."""
    return load_predictor(find_checkpoint())


def predict(image: Image.Image, threshold: float = 0.5, predictor: Predictor | ReusedPredictions | None = None,
            max_side: int = MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS, classes: list[str] | None = None,
            alpha: float = ALPHA) -> tuple[Image.Image, Prediction | SemanticPrediction]:
    """The instances in ``image`` scoring at least ``threshold`` (of ``classes``, when given), and the image with
    them drawn at opacity ``alpha``: what the app shows, and the app's one way to it.

    ``predictor`` defaults to :func:`default_predictor`; a ValueError says why when there is no model. As in the
    app, images over ``max_side`` are downscaled first (so is the overlay) and over ``max_pixels`` refused.
    """
    if predictor is None:
        predictor, note = default_predictor()
        if predictor is None:
            raise ValueError(note)
    image = downscale(as_rgb(image, max_pixels), max_side)
    return render(image, predictor(image, score_threshold=threshold), threshold, classes, alpha)


def build_demo(predictor: Predictor | None, examples: list[str], note: str = "",
               max_side: int = MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS) -> gr.Blocks:
    """The app: an image in, its instances out; without a predictor, a page on how to train one."""
    if predictor is None:
        return train_help_page(note)
    # delete_cache: hourly, Gradio deletes uploads and results over an hour old: a Space does not fill its disk
    with gr.Blocks(title="segkit", delete_cache=(3600, 3600)) as demo:
        ui = app_layout(predictor, examples, note, max_side)
        _connect(ui, predictor, max_side, max_pixels)
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo


def _connect(ui, predictor: Predictor, max_side: int, max_pixels: int) -> None:
    """The events (button, redraws on a new threshold, classes or opacity, /segment API), all via :func:`predict`."""
    scratch = OutputFiles()  # the downloads, and uploads that came as data URLs
    reused = ReusedPredictions(predictor)  # one model run per image: redraws only filter it

    def segment(payload, threshold, classes=None, alpha=ALPHA):
        path, name = upload_path(payload, scratch)
        threshold = parse_threshold(threshold)
        image = read_upload(path, name, max_side, max_pixels)
        drawn, shown = predict(image, threshold, reused, max_side, max_pixels, classes, float(alpha))
        return drawn, detections_table(shown), write_downloads(scratch.new_folder(), name, drawn, shown, predictor)

    def redraw(image, threshold, classes, alpha):
        if image is None:  # nothing to redraw yet
            return gr.skip(), gr.skip(), gr.skip()
        return segment(image, threshold, classes, alpha)

    def segment_api(image, threshold):
        """Segment an image: returns the overlay, a detections table and the download files."""
        return segment(image, threshold)

    # One model run at a time (concurrency_id): the CPU or GPU is already saturated by one.
    common = dict(outputs=[ui.drawn, ui.table, ui.files], preprocess=False, concurrency_id="model")
    ui.run.click(segment, [ui.image, ui.threshold, ui.classes, ui.opacity], api_name="segment_ui",
                 api_visibility="private", **common)
    gr.on([ui.threshold.release, ui.classes.change, ui.opacity.release], redraw,
          [ui.image, ui.threshold, ui.classes, ui.opacity], api_name="redraw", api_visibility="private",
          show_progress="minimal", **common)
    # The API keeps to (image, threshold): an endpoint with no UI trigger, all classes, default opacity.
    gr.on([], segment_api, [ui.image, ui.threshold], api_name="segment", **common)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The app's options (``python demo.py --help``)."""
    parser = argparse.ArgumentParser(description="Serve a segkit checkpoint in the browser.")
    parser.add_argument("--checkpoint", help="segkit .pt, or hf://owner/repo/path.pt "
                                             "(default: $SEGKIT_CHECKPOINT, else newest runs/*/best.pt)")
    # Hugging Face Spaces sets GRADIO_SERVER_NAME/PORT; locally the app stays on this machine.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also ask Gradio for a temporary public link")
    parser.add_argument("--examples", default=None,
                        help="folder of example images (default: the model's own val images where its data is on "
                             f"this machine, else {EXAMPLES_DIR} for a model of the sample's classes)")
    parser.add_argument("--max-side", type=int, default=None,
                        help=f"downscale larger images to this side (default {MAX_SIDE}; with --tile {TILED_MAX_SIDE}: "
                             "tiles are for seeing large photos at full resolution)")
    parser.add_argument("--max-detections", type=int, default=100, help="most instances per image")
    add_tile_arguments(parser)
    add_tta_arguments(parser)
    parser.add_argument("--ls-backend", action="store_true",
                        default=os.environ.get("SEGKIT_LS_BACKEND", "").strip().lower() in ("1", "true", "yes", "on"),
                        help="also serve Label Studio's ML-backend routes (/health, /setup, /predict, /webhook, "
                             "/versions) on the same server; default $SEGKIT_LS_BACKEND. Beyond 127.0.0.1 they need "
                             "BASIC_AUTH_USER and BASIC_AUTH_PASS, or --no-auth")
    parser.add_argument("--no-auth", action="store_true",
                        help="--ls-backend beyond 127.0.0.1 without basic auth: only on a network you trust")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse larger images (a guard against decompression bombs)")
    return parser.parse_args(argv)


def create_demo(args: argparse.Namespace) -> gr.Blocks:
    """Load the model ``args`` point to and build the app around it."""
    return create_demo_and_model(args)[0]


def create_demo_and_model(args: argparse.Namespace) -> tuple[gr.Blocks, Predictor | None]:
    """The app and the predictor it serves (None when there is no model yet)."""
    predictor, note = load_predictor(find_checkpoint(args.checkpoint), args.max_detections)
    if predictor is not None and predictor.task == "instance":
        try:
            predictor.tile(tiling_from_args(args)).augment(tta_from_args(args))
        except UnsupportedOption as e:
            raise SystemExit(f"error: {e}") from None
    max_side = args.max_side or (TILED_MAX_SIDE if getattr(predictor, "tiling", None) else MAX_SIDE)
    print(f"segkit demo: {predictor.info.get('checkpoint') if predictor else 'no model'}. {note}".strip(),
          file=sys.stderr if predictor is None else sys.stdout, flush=True)
    return build_demo(predictor, model_examples(predictor, args.examples), note=note, max_side=max_side,
                      max_pixels=args.max_pixels), predictor


def launch(demo: gr.Blocks, args: argparse.Namespace, predictor: Predictor | None = None) -> None:
    """Serve until interrupted; a failed --share leaves the local server running and says why. With
    ``--ls-backend``, settings that would open the backend to strangers stop it before anything listens."""
    backend = ls_backend_config(args, predictor) if args.ls_backend else None
    if backend is not None:  # SIGTERM (docker stop, a Space's restart) must end a running training too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True)
    if backend is not None:
        add_ls_backend(demo, predictor, backend)
    if args.share and not demo.share_url:
        print(f"segkit demo: no public link: {share_failure_reason()}. Still serving on {demo.local_url}", flush=True)
    demo.block_thread()


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
