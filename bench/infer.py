"""Inference backends side by side: latency against eager, agreement with eager, peak memory.

Every backend runs through the one :class:`segkit.inference.predictor.Predictor` (image in, compact
:class:`Prediction` out), at each size, on the same image. Timed runs alternate between backends
(the order rotates each round) so that machine noise hits all alike; the table shows medians.

    python bench/infer.py [--checkpoint best.pt] [--sizes 512 800] [--runs 5] [--backends eager onnxruntime ...]
    python bench/infer.py --checkpoint best.pt --data EXPORT   # adds box and mask AP on its val split
    python bench/infer.py ... --report docs/benchmarks/infer.md   # also writes the page

AP is measured per backend at the checkpoint's own image size (a model trained at 128 px detects
nothing useful at 800), on the checkpoint's val split of ``--data`` (or the data's own val split).

Backends: eager, eager+channels_last (torch), torchscript, onnxruntime, openvino (f32), openvino-bf16
(where the CPU has bf16), openvino-int8 (NNCF, calibrated on up to 50 training images of --data, else the
sample's). Exported models are written to a temporary folder, one per size (the size is frozen in them). Peak RSS is measured in a separate process per backend and size (load, one image).
Without --checkpoint: a random-init model with the sample's classes, which fills all 100 detection
slots (its detections mean nothing, but they cost what a trained model's cost).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs
from segkit.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from segkit.inference.predictor import Predictor  # noqa: E402

METHOD = """\
Every backend runs through the same `Predictor` (PIL image in, `Prediction` out, masks pasted), at each
size, on the same image resized so that its longest side is the size; the exported models are written once
per size (the size is frozen in them). The timed runs alternate between backends, the order rotating each
round, so that machine noise hits all alike; the table shows the median. The backends: eager PyTorch, eager
channels-last (what `Predictor.from_checkpoint` runs on a CPU by default), TorchScript, ONNX Runtime, OpenVINO
f32, OpenVINO bf16 (only where the CPU has bf16) and OpenVINO INT8 (NNCF post-training quantization, calibrated
as `segkit export --int8` calibrates: on up to 50 training images of `--data`, else of the sample).

"matched": eager's instances that the backend finds again (same class, mask IoU >= 0.5); "mask IoU": the mean
IoU of those matches. Peak RSS: a fresh process that loads the backend and segments the image once. Box and
mask AP (with `--data`): each backend on the checkpoint's val split at the checkpoint's own image size, one
image per forward for every backend, so that batching does not move eager's figures. Without `--checkpoint`
the model is random init with the sample's classes: it fills all 100 detection slots, so its detections mean
nothing but cost what a trained model's cost."""

SAMPLE_IMAGE = next(iter(sorted((REPO / "data" / "sample" / "val" / "images").glob("*.jpg"))), None)
EXPORTED = {"torchscript": ("torchscript", ".torchscript"), "onnxruntime": ("onnx", ".onnx"),
            "openvino": ("openvino", ".xml"), "openvino-bf16": ("openvino", ".xml")}
ALL_BACKENDS = ["eager", "eager+channels_last", "torchscript", "onnxruntime", "openvino", "openvino-bf16",
                "openvino-int8"]
SAMPLE = REPO / "data" / "sample"


def checkpoint_at(source: Path, size: int, folder: Path) -> Path:
    """The same weights with the model's resize set to ``size`` (exports freeze it)."""
    path = folder / f"model_{size}.pt"
    save_checkpoint({**load_checkpoint(source), "img_size": size}, path)
    return path


def random_init_checkpoint(folder: Path) -> Path:
    from segkit.tasks.checkpoint import make_checkpoint
    from segkit.models.mask_rcnn import build_model

    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet50_fpn", 4, weights=None, img_size=512)
    path = folder / "random_init.pt"
    save_checkpoint(make_checkpoint(model, "maskrcnn_resnet50_fpn", ["leaf", "pebble", "shell"], img_size=512,
                                    score_threshold=0.05), path)
    return path


def artifact_for(backend: str, checkpoint: Path, folder: Path, calibration: Path = SAMPLE) -> Path:
    """The checkpoint exported for ``backend`` (written once; INT8 calibrated on ``calibration``'s train split,
    the model's own when it was trained there)."""
    from segkit.inference.export import export
    from segkit.inference.quantize import DEFAULT_CALIBRATION_IMAGES, export_int8

    if backend == "openvino-int8":
        out = folder / f"{checkpoint.stem}_int8.xml"
        if not out.exists():
            # as many calibration images as `segkit export --int8` takes: the INT8 row is what users get
            export_int8(checkpoint, out, calibration, DEFAULT_CALIBRATION_IMAGES, measure_ap=False, show_progress=False)
        return out
    fmt, suffix = EXPORTED[backend]
    out = folder / f"{checkpoint.stem}{suffix}"
    if not out.exists():
        export(checkpoint, fmt, out)
    return out


def load_backend(backend: str, checkpoint: Path, folder: Path, calibration: Path = SAMPLE) -> Predictor:
    """A Predictor running ``backend``; exported ones are exported first."""
    if backend.startswith("eager"):
        return Predictor.from_checkpoint(checkpoint, device="cpu", channels_last=backend == "eager+channels_last")
    path = artifact_for(backend, checkpoint, folder, calibration)
    ckpt = load_checkpoint(path)
    if backend == "openvino-bf16":
        ckpt["export"] = {**ckpt["export"], "bf16": True}
    return Predictor.from_loaded_checkpoint(ckpt, path)


def agreement(reference, other) -> tuple[int, int, float]:
    """(instances of ``reference`` matched, its count, mean mask IoU of the matches): greedy, same class, IoU >= 0.5."""
    a, b = reference.masks, other.masks
    used, ious = set(), []
    for i in range(len(reference)):
        best, best_j = 0.0, None
        for j in range(len(other)):
            if j in used or other.labels[j] != reference.labels[i]:
                continue
            union = np.count_nonzero(a[i] | b[j])
            iou = np.count_nonzero(a[i] & b[j]) / union if union else 1.0
            if iou > best:
                best, best_j = iou, j
        if best_j is not None and best >= 0.5:
            used.add(best_j)
            ious.append(best)
    return len(ious), len(reference), float(np.mean(ious)) if ious else float("nan")


def resized(image: Image.Image, size: int) -> Image.Image:
    scale = size / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)


def peak_rss_mb(backend: str, checkpoint: Path, folder: Path, image: str, size: int) -> float:
    """Peak RSS of a fresh process that loads ``backend`` and segments the image once."""
    proc = subprocess.run([sys.executable, __file__, "--rss-of", backend, "--checkpoint", str(checkpoint),
                           "--scratch", str(folder), "--image", image, "--sizes", str(size)],
                          capture_output=True, text=True)
    return float(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else float("nan")


def ap_of(predictor: Predictor, data: str, ckpt: dict) -> tuple[float, float]:
    """(box AP, mask AP) on the checkpoint's val split of ``data``."""
    from segkit.data.readers import load_dataset
    from segkit.data.splits import model_split
    from segkit.evaluation.evaluate import evaluate_predictor
    from segkit.evaluation.metrics import SegmentationEvaluator

    records, _, _ = model_split(load_dataset(data).images, ckpt, "val", Path(data))
    evaluator = SegmentationEvaluator(records, ckpt["classes"], predictor.score_threshold)
    # one image per forward for every backend: a batch pads its images to one size, which moves eager's AP
    report = evaluate_predictor(predictor, records, evaluator, batch_size=1, show_progress=False)
    return report["bbox"]["AP"], report["segm"]["AP"]


def bench_size(backends: list[str], checkpoint: Path, folder: Path, image: Image.Image, runs: int,
               warmup: int, calibration: Path) -> list[dict]:
    """One row per backend at one size: timings interleaved, then agreement with eager."""
    predictors = {b: load_backend(b, checkpoint, folder, calibration) for b in backends}
    times: dict[str, list[float]] = {b: [] for b in backends}
    for i in range(warmup + runs):
        order = backends[i % len(backends):] + backends[:i % len(backends)]  # rotate who goes first
        for b in order:
            start = time.perf_counter()
            predictors[b](image)
            if i >= warmup:
                times[b].append(time.perf_counter() - start)
    reference = predictors["eager"](image) if "eager" in predictors else None
    rows = []
    for b in backends:
        row = {"backend": b, "median_s": statistics.median(times[b])}
        if reference is not None:
            row["matched"], row["of"], row["mean_iou"] = agreement(reference, predictors[b](image))
        rows.append(row)
    return rows


def ap_by_backend(backends: list[str], source: Path, folder: Path, data: str) -> dict[str, tuple[float, float]]:
    """(box AP, mask AP) of each backend at the checkpoint's own image size."""
    checkpoint = checkpoint_at(source, load_checkpoint(source)["img_size"], folder)
    ckpt = load_checkpoint(checkpoint)
    return {b: ap_of(load_backend(b, checkpoint, folder, Path(data)), data, ckpt) for b in backends}


def bf16_supported() -> bool:
    try:
        import openvino as ov
    except ImportError:
        return False
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def peak_rss_of_self() -> float:
    """This process's peak RSS in MB: VmHWM, which exec resets (ru_maxrss would keep the parent's at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="segkit checkpoint (default: random init)")
    parser.add_argument("--image", default=str(SAMPLE_IMAGE), help="image to segment (default: a sample val image)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 800], help="model sizes (image resized to match)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=ALL_BACKENDS, choices=ALL_BACKENDS)
    parser.add_argument("--data", help="dataset for box/mask AP on the checkpoint's val split")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-backend peak-RSS processes")
    parser.add_argument("--report", default=None, help="also write the page (markdown) here")
    parser.add_argument("--rss-of", help=argparse.SUPPRESS)  # internal: one backend, one image, print peak RSS
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    image = Image.open(args.image).convert("RGB")

    if args.rss_of:
        predictor = load_backend(args.rss_of, Path(args.checkpoint), Path(args.scratch))
        predictor(resized(image, args.sizes[0]))
        print(peak_rss_of_self())
        return

    backends = [b for b in args.backends if b != "openvino-bf16" or bf16_supported()]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        source = Path(args.checkpoint) if args.checkpoint else random_init_checkpoint(folder)
        results = []
        calibration = Path(args.data) if args.data else SAMPLE
        for size in args.sizes:
            checkpoint = checkpoint_at(source, size, folder)
            rows = bench_size(backends, checkpoint, folder, resized(image, size), args.runs, args.warmup,
                              calibration)
            for row in rows:
                row["size"] = size
                if not args.no_rss:
                    row["peak_rss_mb"] = peak_rss_mb(row["backend"], checkpoint, folder, args.image, size)
            results += rows
            print(json.dumps(rows), file=sys.stderr, flush=True)  # progress, in case a later size fails
        aps = ap_by_backend(backends, source, folder, args.data) if args.data else {}
    text = results_markdown(results, source if args.checkpoint else "random init", args, aps)
    print(text)
    if args.report:
        write_report(args.report, "Inference backends", "bench/infer.py", sys.argv[1:], f"{METHOD}\n\n{text}")


def results_markdown(results: list[dict], source, args: argparse.Namespace,
                     aps: dict[str, tuple[float, float]]) -> str:
    """This run's settings and its table (markdown): one row per (backend, size)."""
    ap = f" Box and mask AP on `{args.data}`'s val split at the checkpoint's own image size." if args.data else ""
    model = source if source == "random init" else f"`{source}`"
    lines = [f"Mask R-CNN inference through `Predictor`, {model}, image `{Path(args.image).name}`, CPU, "
             f"{torch.get_num_threads()} torch threads, median of {args.runs} interleaved runs after {args.warmup} "
             f"warm-up round(s).{ap}", "",
             "| backend | size | median (ms) | vs eager | matched | mask IoU | peak RSS (MB) |"
             + (" box AP | mask AP |" if args.data else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if args.data else "")]
    eager = {r["size"]: r["median_s"] for r in results if r["backend"] == "eager"}
    for r in results:
        ratio = f"{r['median_s'] / eager[r['size']]:.2f}x" if r["size"] in eager else "-"
        matched = f"{r['matched']}/{r['of']}" if "matched" in r else "-"
        iou = f"{r['mean_iou']:.3f}" if "mean_iou" in r else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        line = f"| {r['backend']} | {r['size']} | {r['median_s'] * 1e3:.0f} | {ratio} | {matched} | {iou} | {rss} |"
        if args.data:
            line += f" {aps[r['backend']][0]:.3f} | {aps[r['backend']][1]:.3f} |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
