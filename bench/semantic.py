"""Semantic models beside Mask R-CNN: training images/s and inference latency at the same image size.

Every model starts from random init (same seed) and runs on the sample's training images: training
through segkit's own loop (``engine.train_one_epoch``, batch 2, no augmentation), inference through
``Predictor`` on one val image (PIL in, prediction out, masks pasted / class map made). Each
(model, phase) runs in a fresh process, so peak RSS is that phase's own; the phases alternate
between models run by run, and the best run of each is kept.

    python bench/semantic.py [--img-size 320] [--steps 4] [--runs 3] [--repeat 1] [--models ...] \
        [--report docs/benchmarks/semantic.md]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs
SAMPLE = REPO / "data" / "sample"
MODELS = ["maskrcnn_resnet50_fpn", "unet_resnet34", "unet_resnet18", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large"]
METHOD = """\
Semantic segmentation models beside Mask R-CNN R50-FPN at the same image size: training images/s and inference
latency. Every model starts from random init (the same seed). Training runs through segkit's own loop
(`engine.train_one_epoch`, batch 2, no augmentation, Mask R-CNN sampling 128 RoIs per image) on the sample's
training images, timed over a few batches after an untimed warm-up batch. Inference runs through `Predictor`
on one sample val image, loaded from a saved checkpoint as users run it (PIL image in; masks pasted, or the
class map made), the median of a few runs after a warm-up; Mask R-CNN's includes its mask head on all the
detections a random-init model fills (score threshold 0.05). Each (model, phase) runs in a fresh process, so
that peak RSS is that phase's own; the order of the models alternates from run to run and the best run of
each is kept."""


def _is_semantic(arch: str) -> bool:
    from segkit.models.semantic import SEMANTIC_ARCHITECTURES

    return arch in SEMANTIC_ARCHITECTURES


def _model(arch: str, num_classes: int, img_size: int) -> torch.nn.Module:
    from segkit.models.mask_rcnn import build_model
    from segkit.models.semantic import build_semantic_model

    torch.manual_seed(0)
    if _is_semantic(arch):
        return build_semantic_model(arch, num_classes, weights=None, img_size=img_size)
    model = build_model(arch, num_classes, weights=None, img_size=img_size)
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 128  # what CPU training is advised to use
    return model


def time_training(arch: str, img_size: int, steps: int) -> dict:
    """Images/s over ``steps`` batches of 2, after one warm-up batch."""
    from segkit.engine import loops as engine
    from segkit.data.dataset import SegmentationDataset, collate_fn
    from segkit.data.readers import load_dataset
    from segkit.data.dataset import SemanticDataset
    from segkit.data.transforms import build_transform

    records = load_dataset(SAMPLE / "train")
    images = [im for im in records.images if im.instances]
    kind = SemanticDataset if _is_semantic(arch) else SegmentationDataset
    dataset = kind(images, records.classes, build_transform("none", train=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=False, num_workers=0, collate_fn=collate_fn)
    model = _model(arch, len(records.classes) + 1, img_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    device = torch.device("cpu")
    batches = iter(loader)
    engine.train_one_epoch(model, optimizer, islice(batches, 1), device, show_progress=False)
    start = time.perf_counter()
    engine.train_one_epoch(model, optimizer, islice(batches, steps), device, show_progress=False)
    seconds = time.perf_counter() - start
    return {"images_per_s": 2 * steps / seconds}


def time_inference(arch: str, img_size: int, runs: int) -> dict:
    """Median seconds of ``predictor(image)`` on one val image, through a saved checkpoint as users run it."""
    from segkit.models.checkpoint import save_checkpoint
    from segkit.tasks.checkpoint import make_checkpoint
    from segkit.data.images import load_image
    from segkit.inference.predictor import Predictor

    classes = ["leaf", "pebble", "shell"]
    model = _model(arch, len(classes) + 1, img_size)
    task = "semantic" if _is_semantic(arch) else "instance"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        save_checkpoint(make_checkpoint(model, arch, classes, img_size, 0.05, task=task), path)
        predictor = Predictor.from_checkpoint(path)
    image = load_image(sorted((SAMPLE / "val" / "images").iterdir())[0])
    predictor(image)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predictor(image)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "image": f"{image.width}x{image.height}"}


def run_one(args) -> dict:
    result = time_training(args.model, args.img_size, args.steps) if args.phase == "train" else \
        time_inference(args.model, args.img_size, args.runs)
    return {**result, "model": args.model, "phase": args.phase,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=320)
    parser.add_argument("--steps", type=int, default=4, help="training batches (of 2) to time")
    parser.add_argument("--runs", type=int, default=3, help="timed predictions per inference run (median)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (model, phase), alternating")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--report", default=None, help="also write the page (markdown) here")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["train", "infer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_one(args)))
        return
    results = []
    for i in range(args.repeat):
        for phase in ("train", "infer"):
            for model in (args.models if i % 2 == 0 else args.models[::-1]):
                cmd = [sys.executable, __file__, "--model", model, "--phase", phase, "--img-size", str(args.img_size),
                       "--steps", str(args.steps), "--runs", str(args.runs)]
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO).stdout
                results.append(json.loads(out.splitlines()[-1]))
    text = results_markdown(results, args)
    print(text)
    if args.report:
        write_report(args.report, "Semantic models beside Mask R-CNN", "bench/semantic.py", sys.argv[1:],
                     f"{METHOD}\n\n{text}")


def results_markdown(results: list[dict], args: argparse.Namespace) -> str:
    """This run's settings and its table (markdown): the best run of each (model, phase), one row per model."""
    best = {}
    for r in results:
        key = (r["model"], r["phase"])
        better = (lambda a, b: a["images_per_s"] > b["images_per_s"]) if r["phase"] == "train" else \
            (lambda a, b: a["median_s"] < b["median_s"])
        if key not in best or better(r, best[key]):
            best[key] = r
    base = best.get(("maskrcnn_resnet50_fpn", "infer"), {}).get("median_s")
    image = next(r["image"] for r in results if r["phase"] == "infer")
    lines = [f"Random init, {args.img_size} px, CPU ({torch.get_num_threads()} threads); training: batch 2, "
             f"{args.steps} steps; inference: {image} image, median of {args.runs}; best of {args.repeat} run(s) "
             "each.", "",
             "| model | training images/s | training peak RSS (MB) | inference (ms) | vs Mask R-CNN | "
             "inference peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for model in args.models:
        train, infer = best[(model, "train")], best[(model, "infer")]
        ratio = f"{infer['median_s'] / base:.2f}x" if base else "-"
        lines.append(f"| `{model}` | {train['images_per_s']:.2f} | {train['peak_mb']:.0f} | "
                     f"{infer['median_s'] * 1000:.0f} | {ratio} | {infer['peak_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
