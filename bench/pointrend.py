"""What PointRend costs: inference latency and peak memory, and training step time, against the standard head.

Each measurement runs in its own process (so that peak RSS is that variant's own), in the order
standard, pointrend, pointrend, standard, ... so that a slow drift of a shared machine hits both alike.
Latency is ``predictor(image)`` (decoded PIL image in, thresholded numpy masks out, pasting included),
median of every timed run; training is ``engine.train_one_epoch`` over a few steps after a warm-up step.

    python bench/pointrend.py [--standard A.pt --pointrend B.pt] [--runs 5] [--repeat 2] [--img-size 512] \
        [--report docs/benchmarks/pointrend.md]

Without checkpoints both models are random init from one seed, the PointRend model carrying the
standard one's weights: they return the same boxes, and all ``--detections`` of them get a mask
(score threshold 0), so the difference is the mask head's alone.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs
CLASSES = ["leaf", "pebble", "shell"]
HEADS = ("standard", "pointrend")
METHOD = """\
What PointRend's mask head costs against the standard one, in inference and in training. Inference:
`predictor(image)` on one sample val image resized so that its shorter side is the model's size (decoded PIL
image in, thresholded masks out, pasting included), the median of every timed run after a warm-up. Training:
`engine.train_one_epoch` over a few batches of 2 sample training images (no augmentation, 128 sampled RoIs
per image), one untimed warm-up step, the median step. Each measurement runs in a process of its own, so that
peak memory is that head's own, in the order standard, PointRend, PointRend, standard, ... so that a slow
drift of the machine hits both alike. Without checkpoints both models are random init from one seed, the
PointRend model carrying the standard one's weights: they return the same boxes, and every detection gets a
mask (score threshold 0), so the difference is the mask head's alone."""


def random_model(head: str, img_size: int, resolution: int) -> torch.nn.Module:
    """A random-init model; PointRend's shares every weight with the standard one but its point head."""
    from segkit.models.mask_rcnn import build_model

    torch.manual_seed(0)
    standard = build_model("maskrcnn_resnet50_fpn", len(CLASSES) + 1, weights=None, img_size=img_size)
    if head == "standard":
        return standard
    model = build_model("maskrcnn_resnet50_fpn", len(CLASSES) + 1, weights=None, img_size=img_size,
                        mask_head="pointrend", mask_resolution=resolution)
    model.load_state_dict(standard.state_dict(), strict=False)  # all but roi_heads.point_head.*
    return model


def sample_image(img_size: int):
    from segkit.data.images import load_image

    path = sorted((REPO / "data" / "sample" / "val" / "images").glob("*.jpg"))[0]
    image = load_image(path)
    scale = img_size / min(image.size)  # the model's own resize is then a no-op
    return image.resize((round(image.width * scale), round(image.height * scale)))


def measure_inference(args) -> dict:
    from segkit.inference.predictor import Predictor

    checkpoint = getattr(args, args.head)
    if checkpoint:
        predictor = Predictor.from_checkpoint(checkpoint, device=args.device, max_detections=args.detections)
        threshold = None  # the checkpoint's own
    else:
        model = random_model(args.head, args.img_size, args.resolution)
        predictor = Predictor(model, CLASSES, 0.0, device=args.device, max_detections=args.detections)
        threshold = 0.0
    image = sample_image(predictor.info.get("img_size", args.img_size))
    found = len(predictor(image, threshold))  # warm-up
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        predictor(image, threshold)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if predictor.device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"times": times, "peak_mb": peak, "instances": found,
            "size": f"{image.width}x{image.height}"}


def measure_training(args) -> dict:
    from itertools import islice

    from segkit.engine import loops as engine
    from segkit.data.dataset import SegmentationDataset, collate_fn
    from segkit.data.readers import load_dataset
    from segkit.data.transforms import build_transform

    records = load_dataset(REPO / "data" / "sample" / "train")
    images = [im for im in records.images if im.instances][: (args.steps + 1) * 2]
    dataset = SegmentationDataset(images, records.classes, build_transform("none", train=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    device = torch.device(args.device)
    model = random_model(args.head, args.img_size, args.resolution).to(device)
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 128
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    batches = list(loader)
    engine.train_one_epoch(model, optimizer, batches[:1], device, show_progress=False)  # warm-up
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        engine.train_one_epoch(model, optimizer, islice([batch], 1), device, show_progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--standard", help="a standard-head checkpoint (default: random init)")
    parser.add_argument("--pointrend", help="a PointRend checkpoint (default: random init)")
    parser.add_argument("--img-size", type=int, default=512, help="shorter side, for random-init models")
    parser.add_argument("--resolution", type=int, default=224, help="PointRend mask resolution, random init")
    parser.add_argument("--detections", type=int, default=100, help="most instances per image")
    parser.add_argument("--runs", type=int, default=5, help="timed inferences per process")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per process (0: skip)")
    parser.add_argument("--repeat", type=int, default=2, help="processes per head and measurement, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--report", default=None, help="also write the page (markdown) here")
    parser.add_argument("--job", choices=["infer", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--head", choices=HEADS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.job:
        print(json.dumps(measure_inference(args) if args.job == "infer" else measure_training(args)))
        return

    results = {(job, head): [] for job in ("infer", "train") for head in HEADS}
    jobs = ["infer"] + (["train"] if args.steps else [])
    for job in jobs:
        for i in range(args.repeat):
            for head in HEADS if i % 2 == 0 else HEADS[::-1]:
                cmd = [sys.executable, __file__, "--job", job, "--head", head] + [
                    f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                    if k not in ("job", "head", "report") and v is not None]
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
                results[(job, head)].append(json.loads(out.splitlines()[-1]))
    text = results_markdown(args, results, jobs)
    print(text)
    if args.report:
        write_report(args.report, "PointRend: what it costs", "bench/pointrend.py", sys.argv[1:],
                     f"{METHOD}\n\n{text}")


def results_markdown(args: argparse.Namespace, results: dict, jobs: list[str]) -> str:
    """This run's settings and its tables (markdown): inference per head, then the training step if timed."""
    infer = {h: results[("infer", h)] for h in HEADS}
    p50 = {h: statistics.median(t for r in infer[h] for t in r["times"]) * 1000 for h in HEADS}
    first = infer["standard"][0]
    models = f"`{args.standard}` and `{args.pointrend}`" if args.standard or args.pointrend else "random init"
    peak = "peak GPU memory (MB)" if args.device.startswith("cuda") else "peak RSS (MB)"
    lines = [f"PointRend against the standard mask head, {models}, {args.device}, {args.threads} threads, image "
             f"{first['size']}, {args.repeat} processes x {args.runs} runs each, alternating.", "",
             f"| mask head | instances | inference p50 (ms) | ratio | {peak} |", "|---|---|---|---|---|"]
    for h in HEADS:
        label = h if h == "standard" or args.pointrend else f"pointrend {args.resolution}"
        lines.append(f"| {label} | {infer[h][0]['instances']} | {p50[h]:.0f} | {p50[h] / p50['standard']:.2f}x | "
                     f"{max(r['peak_mb'] for r in infer[h]):.0f} |")
    if "train" in jobs:
        step = {h: statistics.median(t for r in results[("train", h)] for t in r["times"]) * 1000 for h in HEADS}
        lines += ["", f"Training step (batch 2, {args.img_size} px, 128 RoIs per image), median of "
                  f"{args.repeat * args.steps} steps:", "",
                  "| mask head | training step p50 (ms) | ratio |", "|---|---|---|"]
        lines += [f"| {h} | {step[h]:.0f} | {step[h] / step['standard']:.2f}x |" for h in HEADS]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
