"""Inference latency: segkit's ``overlay(image, predictor(image))`` against the bare torchvision forward.

Both run the same model on the same decoded image, in the same process, interleaved so that machine
noise hits both alike: the bare forward gets the image already as a float tensor, segkit starts from
the PIL image and ends with the drawn overlay. Measured at the checkpoint's image size and at 800 px
(the image is resized so its longer side is that size, and the model's own resize is set to match).

    python bench/infer.py [--checkpoint runs/exp/best.pt] [--runs 20] [--sizes 0 800] [--device cpu]

Without --checkpoint it uses the newest runs/*/best.pt, else a random-init model with the sample's
classes (its detections are meaningless, but it pastes as many masks as a trained one: the cost is real).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

REPO = Path(__file__).resolve().parents[1]

from segkit.images import load_image
from segkit.model import image_size_kwargs
from segkit.predictor import Predictor
from segkit.runs import newest_best
from segkit.visualize import overlay

SAMPLE_IMAGE = next(iter(sorted((REPO / "data" / "sample" / "val" / "images").glob("*.jpg"))), None)


def random_init_checkpoint(folder: Path) -> Path:
    """A self-describing checkpoint of an untrained model, for when no trained one exists."""
    from segkit.checkpoint import make_checkpoint, save_checkpoint
    from segkit.model import build_model

    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet50_fpn", 4, weights=None, img_size=512)
    path = folder / "random_init.pt"
    save_checkpoint(make_checkpoint(model, "maskrcnn_resnet50_fpn", ["leaf", "pebble", "shell"], img_size=512), path)
    return path


def find_checkpoint(spec: str | None, scratch: Path) -> tuple[Path, str]:
    if spec:
        return Path(spec), spec
    newest = newest_best(REPO / "runs")
    if newest:
        return newest, str(newest)
    return random_init_checkpoint(scratch), "random init (no runs/*/best.pt)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_size(predictor: Predictor, image: Image.Image, size: int, runs: int, warmup: int) -> dict:
    """p50/p95 seconds of both pipelines at one size, plus the number of instances drawn."""
    scale = size / max(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    model, device = predictor.model, predictor.device
    kwargs = image_size_kwargs(size)
    model.transform.min_size, model.transform.max_size = (kwargs["min_size"],), kwargs["max_size"]
    tensor = pil_to_tensor(image).to(device).float().div_(255)

    def bare():
        with torch.inference_mode():
            model([tensor])

    def segkit():
        return overlay(image, predictor(image))

    times = {"bare": [], "segkit": []}
    for i in range(warmup + runs):
        for name, fn in (("bare", bare), ("segkit", segkit)) if i % 2 else (("segkit", segkit), ("bare", bare)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    stats = {name: np.percentile(t, [50, 95]) for name, t in times.items()}
    return {"size": size, "image": image.size, "instances": len(predictor(image)), **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="segkit checkpoint (default: newest runs/*/best.pt, else random init)")
    parser.add_argument("--image", default=SAMPLE_IMAGE, help="image to segment (default: a sample val image)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 800], help="longer sides; 0 = the checkpoint's")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        path, source = find_checkpoint(args.checkpoint, Path(scratch))
        predictor = Predictor.from_checkpoint(path, device=args.device)
    image = load_image(args.image)  # EXIF rotation applied, as everywhere in segkit
    rows = [time_size(predictor, image, size or predictor.info["img_size"], args.runs, args.warmup)
            for size in args.sizes]

    print(f"Mask R-CNN ({predictor.info['arch']}) inference, {source}, {args.device}, "
          f"{torch.get_num_threads()} threads, {args.runs} runs, threshold {predictor.score_threshold}")
    print(f"{'size':>6}{'image':>11}{'inst':>6}{'bare p50':>10}{'bare p95':>10}"
          f"{'segkit p50':>12}{'segkit p95':>12}{'ratio p50':>11}")
    for r in rows:
        (b50, b95), (s50, s95) = r["bare"], r["segkit"]
        print(f"{r['size']:>6}{'x'.join(map(str, r['image'])):>11}{r['instances']:>6}{b50 * 1e3:>8.0f}ms{b95 * 1e3:>8.0f}ms"
              f"{s50 * 1e3:>10.0f}ms{s95 * 1e3:>10.0f}ms{s50 / b50:>10.2f}x")
    print("segkit = overlay(image, predictor(image)) from a PIL image; bare = model([tensor]) on the same "
          "decoded tensor. Goal: segkit p50 <= 1.10x bare.")


if __name__ == "__main__":
    main()
