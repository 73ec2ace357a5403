"""Interactive prompts against full forwards: is a prompt on an already-seen image cheap enough to feel live?

Side by side, on the same images, CPU and process, for each size:

- **full forward**: the :class:`segkit.inference.predictor.Predictor` call (``predictor(image)``) that a plain
  pre-annotation runs;
- **first prompt**: a box prompt on an image the :class:`segkit.serve.prompts.PromptEngine` has not seen (its cache
  cleared before each run): the full pass that fills the cache, then the heads on the box;
- **warm box / warm click**: a further box prompt, or a positive click, on an image already in the cache:
  only the box and mask heads run (or nothing, for a click on a detection).

Goals (issue #20): warm prompt <= 0.25x the full forward; first prompt no slower than the full forward.

    python -m bench.prompts [--sizes 320 800] [--images 3] [--runs 2] [--max-detections 100] \
        [--report docs/benchmarks/prompts.md]

Models are random-init (``weights=None``, the sample's 3 classes, score threshold 0.05): latency does not
depend on training, and such a model fills every detection slot, so the mask head costs what a trained
model's costs on a busy image. Images: the sample's val split, resized so the shorter side is the size
(320 is about the sample's own, median shorter side 318 px), the model's ``img_size`` set to the same.
Timed calls rotate their order each round, so machine noise hits all alike; median and p90 are over every
(image, run). Peak RSS is this process's high-water mark after each size (VmHWM); "cache entry" is the FPN
features one cached image holds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs
from segkit.models.checkpoint import save_checkpoint  # noqa: E402
from segkit.tasks.checkpoint import make_checkpoint  # noqa: E402
from segkit.models.mask_rcnn import build_model  # noqa: E402
from segkit.inference.predictor import Predictor  # noqa: E402
from segkit.serve.prompts import PromptEngine  # noqa: E402

VAL_IMAGES = REPO / "data" / "sample" / "val" / "images"
CLASSES = ["leaf", "pebble", "shell"]
KINDS = ("full forward", "first prompt (cold)", "warm box prompt", "warm click prompt")
METHOD = """\
Is a prompt on an image the model has already seen cheap enough to feel live? Side by side, on the same
images, in one process, for each size: the **full forward** (`predictor(image)`, what a plain pre-annotation
runs); the **first prompt**, a box prompt on an image the `PromptEngine` has not seen (its cache cleared
before each run: the full pass that fills the cache, then the heads on the box); and a **warm box** or **warm
click** prompt on an image already in the cache, where only the box and mask heads run (or nothing, for a
click on a detection). Goals (issue #20): a warm prompt at most 0.25x the full forward; the first prompt no
slower than the full forward.

The models are random init (the sample's 3 classes, score threshold 0.05): latency does not depend on
training, and such a model fills every detection slot, so the mask head costs what a trained model's costs
on a busy image. The images are the sample's val split, resized so that the shorter side is the size (320 px
is about the sample's own), with the model's `img_size` set to the same. The timed calls rotate their order
each round, so that machine noise hits all alike; median and p90 are over every (image, run). Peak RSS is
the process's high-water mark after each size; "cache entry" is the FPN features one cached image holds."""


def random_predictor(size: int, folder: Path, max_detections: int) -> Predictor:
    """A random-init Mask R-CNN at ``img_size`` ``size``, loaded as the backend loads a checkpoint."""
    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet50_fpn", len(CLASSES) + 1, weights=None, img_size=size)
    path = folder / f"random_{size}.pt"
    save_checkpoint(make_checkpoint(model, "maskrcnn_resnet50_fpn", CLASSES, img_size=size, score_threshold=0.05),
                    path)
    return Predictor.from_checkpoint(path, device="cpu", max_detections=max_detections)


def resized(path: Path, size: int) -> np.ndarray:
    """The image with its shorter side at ``size`` pixels, as an RGB array."""
    im = Image.open(path).convert("RGB")
    scale = size / min(im.size)
    return np.asarray(im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def prompt_boxes(image: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Two boxes an annotator might draw: the middle third, and an off-centre quarter."""
    h, w = image.shape[:2]
    return (w / 3, h / 3, 2 * w / 3, 2 * h / 3), (w / 8, h / 2, 3 * w / 8, 3 * h / 4)


def bench_image(predictor: Predictor, engine: PromptEngine, key: str, image: np.ndarray, runs: int,
                times: dict[str, list[float]]) -> None:
    """``runs`` rounds of the four calls on one image, their order rotated each round."""
    first_box, second_box = prompt_boxes(image)
    h, w = image.shape[:2]

    def cold() -> None:
        engine.cache.clear()
        engine.box(key, image, first_box)

    calls = {KINDS[0]: lambda: predictor(image), KINDS[1]: cold,
             KINDS[2]: lambda: engine.box(key, image, second_box),
             KINDS[3]: lambda: engine.clicks(key, image, [(w * 0.6, h * 0.4)])}
    engine.features(key, image)  # the warm calls' precondition (cold() clears the cache, then fills it again)
    for r in range(runs):
        for kind in KINDS[r % 4:] + KINDS[:r % 4]:
            times[kind].append(timed(calls[kind]))


def p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


def peak_rss_mb() -> float:
    """This process's peak RSS in MB (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_size(size: int, paths: list[Path], runs: int, max_detections: int, folder: Path) -> dict:
    predictor = random_predictor(size, folder, max_detections)
    engine = PromptEngine(predictor, version=f"bench-{size}")
    images = [resized(p, size) for p in paths]
    predictor(images[0])  # warm-up: first-call allocations and oneDNN kernel choice
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for path, image in zip(paths, images):
        bench_image(predictor, engine, path.name, image, runs, times)
    entry = engine.features(paths[-1].name, images[-1])
    cache_mb = sum(t.element_size() * t.nelement() for t in entry.features.values()) / 2**20
    return {"size": size, "times": times, "rss": peak_rss_mb(), "cache_mb": cache_mb, "shape": images[0].shape}


def size_markdown(result: dict) -> list[str]:
    """One size's heading, table and goals (markdown lines)."""
    times, full = result["times"], statistics.median(result["times"][KINDS[0]])
    lines = [f"## {result['size']} px", "",
             f"First image {result['shape'][1]}x{result['shape'][0]}, peak RSS {result['rss']:.0f} MB, "
             f"cache entry {result['cache_mb']:.1f} MB.", "",
             "| call | median (ms) | p90 (ms) | x full forward |", "|---|---|---|---|"]
    for kind in KINDS:
        med = statistics.median(times[kind])
        lines.append(f"| {kind} | {med:.1f} | {p90(times[kind]):.1f} | {med / full:.2f} |")
    warm = max(statistics.median(times[k]) for k in KINDS[2:]) / full
    cold = statistics.median(times[KINDS[1]]) / full
    lines += ["", f"Goal warm <= 0.25x full: {'met' if warm <= 0.25 else 'MISSED'} ({warm:.2f}x, the slower warm "
              f"kind); first prompt <= full forward: {'met' if cold <= 1.0 else 'MISSED'} ({cold:.2f}x)."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[320, 800], help="shorter image side (and img_size)")
    p.add_argument("--images", type=int, default=3, help="val images to time on")
    p.add_argument("--runs", type=int, default=2, help="rounds per image")
    p.add_argument("--max-detections", type=int, default=100, help="the backend's default: 100")
    p.add_argument("--report", default=None, help="also write the page (markdown) here")
    args = p.parse_args()
    import tempfile

    paths = sorted(VAL_IMAGES.glob("*.jpg"))[:args.images]
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(paths)} images x {args.runs} runs, "
             f"random-init Mask R-CNN R50-FPN, max {args.max_detections} detections."]
    print(lines[0])
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            section = size_markdown(bench_size(size, paths, args.runs, args.max_detections, Path(folder)))
            print("\n" + "\n".join(section), flush=True)
            lines += ["", *section]
    if args.report:
        write_report(args.report, "Interactive prompts against full forwards", "bench/prompts.py", sys.argv[1:],
                     f"{METHOD}\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
