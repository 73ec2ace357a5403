"""Clicks that correct a mask, measured with RITM's protocol: the refinement head against picking detections.

On a checkpoint's held-out images (its ``--split`` s, test by default), every annotated object is segmented
from clicks alone by a simulated annotator (RITM's clicker, :func:`segkit.engine.refiner.next_click`): the
first click at the point farthest inside the object, then each click at the point farthest inside the larger
error of the current mask (positive in a missed area, negative in a false one), the previous mask fed back,
up to ``--clicks`` (20). Two engines answer on the same model:

- **picking** (segkit without a refinement head): a positive click takes the detection whose mask holds it
  and no negative click (or the mask head on squares around it); the object's mask is the union of the
  answers to all clicks so far;
- **refinement head** (:meth:`segkit.serve.prompts.PromptEngine.refine`): the first click's answer is then
  corrected by the head with every further click.

Reported: NoC@85 and NoC@90 (clicks until the IoU first reaches 0.85 / 0.90, ``--clicks`` where it never
does), mean IoU after each click, the gain from click 1 to click 5 on objects the first click leaves under
0.85, and one click's time on an image already seen against a full forward.

    python bench/clicks.py --checkpoint CKPT_WITH_REFINER [--split val test] [--clicks 20]
        [--plot docs/benchmarks/clicks.png] [--report docs/benchmarks/clicks.md]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs
from segkit.data.readers import load_dataset  # noqa: E402
from segkit.data.splits import model_split  # noqa: E402
from segkit.data.dataset import SegmentationDataset  # noqa: E402
from segkit.engine.refiner import next_click  # noqa: E402
from segkit.inference.predictor import Predictor  # noqa: E402
from segkit.models.checkpoint import load_checkpoint  # noqa: E402
from segkit.serve.prompts import PromptEngine  # noqa: E402

TARGETS = (0.85, 0.90)
ENGINES = ("picking", "refinement head")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def trajectory(engine: PromptEngine, refine: bool, key: str, image: np.ndarray, truth: np.ndarray, label: int,
               limit: int) -> list[float]:
    """IoU with ``truth`` after each of ``limit`` clicks (RITM's protocol, see the module's docstring)."""
    mask, clicks, ious = np.zeros_like(truth), [], []
    for _ in range(limit):
        click = next_click(mask, truth)
        if click is None:  # exact: the IoU stays 1
            ious.append(1.0)
            continue
        (x, y), positive = click
        clicks.append((x, y, positive))
        if refine:
            answer = engine.refine(key, image, clicks, label=label)
            mask = answer.mask if answer is not None else np.zeros_like(truth)
        else:
            positives = [(x, y) for x, y, p in clicks if p]
            negatives = [(x, y) for x, y, p in clicks if not p]
            answers = engine.clicks(key, image, positives, negatives, [label] * len(positives))
            mask = np.zeros_like(truth)
            for a in answers:
                mask |= a.mask
        ious.append(iou(mask, truth))
    return ious


def held_out_records(ckpt: dict, data: str | None, splits: list[str]) -> list:
    """The records of the checkpoint's ``splits``, read from ``data`` (default: the data its config names)."""
    data = data or ckpt["config"]["data"]
    images = load_dataset(data).images
    return [r for name in splits for r in model_split(images, ckpt, name, Path(data))[0]]


def noc(ious: list[float], target: float, limit: int) -> int:
    return next((i + 1 for i, v in enumerate(ious) if v >= target), limit)


def click_timing(engine: PromptEngine, predictor: Predictor, image: np.ndarray, truth: np.ndarray, label: int,
                 repeat: int = 5) -> tuple[float, float]:
    """(median seconds of a full forward, of one refinement click on the image already seen)."""
    forward, click = [], []
    ys, xs = np.nonzero(truth)
    first = (float(xs.mean()), float(ys.mean()), True)
    for r in range(repeat):
        t = time.perf_counter()
        predictor(image)
        forward.append(time.perf_counter() - t)
        engine.features("timing", image)
        engine.refine("timing", image, [first], label=label)
        t = time.perf_counter()  # a new second click each time: nothing memoized
        engine.refine("timing", image, [first, (float(xs.min()) + r + 0.5, float(ys.mean()), False)], label=label)
        click.append(time.perf_counter() - t)
    return statistics.median(forward), statistics.median(click)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint with a refinement head (segkit refiner)")
    p.add_argument("--data", help="its dataset (default: the one its config names)")
    p.add_argument("--split", nargs="+", default=["test"], help="held-out splits of the checkpoint to click on")
    p.add_argument("--clicks", type=int, default=20)
    p.add_argument("--max-detections", type=int, default=100)
    p.add_argument("--plot", help="also draw mean IoU against clicks into this PNG")
    p.add_argument("--report", help="also write the page (markdown) here")
    args = p.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    records = held_out_records(ckpt, args.data, args.split)
    dataset = SegmentationDataset(records, ckpt["classes"])
    predictor = Predictor.from_loaded_checkpoint(ckpt, args.checkpoint, "cpu", args.max_detections)
    if predictor.refiner is None:
        sys.exit(f"{args.checkpoint} has no refinement head: python -m segkit refiner {args.checkpoint}")
    curves = {name: [] for name in ENGINES}
    start = time.perf_counter()
    for i, record in enumerate(records):
        image, masks, labels = dataset.load(i)
        for k, (truth, label) in enumerate(zip(masks.astype(bool), labels)):
            for name in ENGINES:
                engine = PromptEngine(predictor, version="bench")
                if name == "picking":
                    engine.refiner = None
                curves[name].append(trajectory(engine, name != "picking", f"{record.path}#{k}", image, truth,
                                               int(label), args.clicks))
        print(f"{i + 1}/{len(records)} images, {len(curves['picking'])} objects, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    image, masks, labels = dataset.load(0)
    forward, click = click_timing(PromptEngine(predictor, version="timing"), predictor, image,
                                  masks[0].astype(bool), int(labels[0]))
    lines = report_lines(ckpt, args, curves, len(records), forward, click)
    print("\n".join(lines))
    if args.plot:
        plot(curves, args.plot)
    if args.report:
        write_report(args.report, "Clicks that correct a mask: the refinement head against picking", "bench/clicks.py",
                     sys.argv[1:], METHOD + "\n\n" + "\n".join(lines)
                     + (f"\n\n![mean IoU against clicks]({Path(args.plot).name})" if args.plot else ""))


METHOD = """\
RITM's protocol on the checkpoint's held-out images: every annotated object is segmented from clicks alone,
the first click at the point farthest inside the object, each next click at the point farthest inside the
larger error of the current mask (positive in a missed area, negative in a false one), the previous mask fed
back, up to the cap. *Picking* is segkit's engine without a refinement head (a click takes the detection
whose mask holds it and no negative click; the object's mask is the union of the answers); the *refinement
head* corrects the first click's answer with every further click (`PromptEngine.refine`). NoC@85 / NoC@90:
clicks until the IoU first reaches 0.85 / 0.90, the cap where it never does."""


def report_lines(ckpt: dict, args, curves: dict, images: int, forward: float, click: float) -> list[str]:
    refiner = ckpt.get("refiner") or {}
    metrics = ckpt.get("metrics") or {}
    n = len(curves["picking"])
    lines = [f"Model: `{ckpt['arch']}` at {ckpt['img_size']} px, val mask AP "
             f"{metrics.get('val_segm_map', float('nan')):.3f} (epoch {ckpt.get('epoch')}); refinement head trained "
             f"{refiner.get('steps')} steps on {refiner.get('objects')} objects of the train split in "
             f"{refiner.get('seconds')} s. Held-out: {images} images of the {' and '.join(args.split)} split, {n} objects, "
             f"cap {args.clicks} clicks (the head never saw them; a val split chose the detector's best epoch).", "",
             "| engine | NoC@85 | NoC@90 | IoU@1 | IoU@3 | IoU@5 | IoU@10 | IoU@20 |", "|---|---|---|---|---|---|---|---|"]
    for name, runs in curves.items():
        mean = np.mean(runs, 0)
        nocs = [statistics.mean(noc(r, t, args.clicks) for r in runs) for t in TARGETS]
        at = [mean[k - 1] if k <= args.clicks else float("nan") for k in (1, 3, 5, 10, 20)]
        lines.append(f"| {name} | {nocs[0]:.2f} | {nocs[1]:.2f} | " + " | ".join(f"{v:.3f}" for v in at) + " |")
    ratio = statistics.mean(noc(r, 0.85, args.clicks) for r in curves["refinement head"]) / \
        statistics.mean(noc(r, 0.85, args.clicks) for r in curves["picking"])
    hard = [i for i, r in enumerate(curves["refinement head"]) if r[0] < 0.85]
    lines += ["", f"- NoC@85, refinement head / picking: **{ratio:.2f}** (goal <= 0.6)."]
    if hard:
        runs = [curves["refinement head"][i] for i in hard]
        gain = statistics.mean(r[min(4, len(r) - 1)] for r in runs) - statistics.mean(r[0] for r in runs)
        lines.append(f"- Objects the first click leaves under 0.85 IoU: {len(hard)} of {n}; their mean IoU after 5 "
                     f"clicks minus after 1: **{gain:+.3f}** (goal >= +0.10).")
    lines.append(f"- One refinement click on an image already seen: {click * 1000:.0f} ms against a full forward's "
                 f"{forward * 1000:.0f} ms: **{click / forward:.2f}x** (goal <= 0.25x).")
    lines += ["", "Mean IoU after each click:", "", "| clicks | " + " | ".join(ENGINES) + " |", "|---|---|---|"]
    means = {name: np.mean(runs, 0) for name, runs in curves.items()}
    lines += [f"| {k + 1} | " + " | ".join(f"{means[name][k]:.3f}" for name in ENGINES) + " |"
              for k in range(args.clicks)]
    return lines


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in curves.items():
        mean = np.mean(runs, 0)
        ax.plot(range(1, len(mean) + 1), mean, marker="o", markersize=3, label=name)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
