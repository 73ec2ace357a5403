"""Does PointRend outline objects better than the standard head? Both trained the same way, side by side.

For each seed, trains the standard and the PointRend head with the tests' overfit recipe (4 sample images at
128 px, random init, ``tests.helpers.overfit_config``), then scores each ground-truth instance against its
best same-class prediction at the image's own size: mean mask IoU, mean Boundary IoU, instances found
(IoU >= 0.5). The last columns are the PointRend model's own 224 x 224 renders against its 28 x 28 coarse
masks on the same detections: what the point head adds, apart from which instances a run finds.

    python -m bench.pointrend_quality [--seeds 0 1 2] [--epochs 50] [--out runs/bench-pointrend] \
        [--report docs/benchmarks/pointrend_quality.md]

This was a test once; it measures a training outcome, which moves with the seed, the CPU's kernels and the
thread count by more than the heads differ (README, "Sharper masks: PointRend"), so it reports instead.
"""
from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.report import write_report  # noqa: E402 - after the path it needs
from segkit.inference.predictor import Predictor  # noqa: E402
from segkit.engine.trainer import train  # noqa: E402
from tests.helpers import SAMPLE, TINY_IMAGES, instance_scores, overfit_config, write_subset  # noqa: E402

METHOD = """\
Does PointRend outline objects better than the standard mask head? For each seed, both heads are trained the
same way, with the tests' overfit recipe (4 sample images at 128 px, random init), and each ground-truth
instance of those images is scored against its best same-class prediction at the image's own size: mean mask
IoU, mean Boundary IoU, and the instances found (IoU >= 0.5). The last column compares the PointRend model's
own 224 x 224 renders with its 28 x 28 coarse masks on the instances both find: what the point head adds,
apart from which instances a run finds. A training outcome moves with the seed, the CPU's kernels and the
thread count, by as much as the heads differ or more: read the seeds side by side."""


def scores(checkpoint: str, val: Path, coarse: bool = False) -> np.ndarray:
    """(IoU, Boundary IoU) per ground-truth instance; ``coarse``: PointRend without subdivision."""
    predictor = Predictor.from_checkpoint(checkpoint)
    if coarse:
        predictor.model.roi_heads.steps = 0  # the 28 x 28 coarse mask, pasted as the standard head's is
    return np.array(instance_scores(predictor, val))


def summary(s: np.ndarray) -> str:
    return f"{s[:, 0].mean():.3f} / {s[:, 1].mean():.3f} / {int((s[:, 0] >= 0.5).sum())} of {len(s)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=50)  # the README's figures
    p.add_argument("--out", default="runs/bench-pointrend")
    p.add_argument("--report", default=None, help="also write the page (markdown) here")
    args = p.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not data.exists():
        write_subset(SAMPLE / "train", data, 4, names=TINY_IMAGES)
    rows = []
    for seed in args.seeds:
        best = {head: train(overfit_config(data, out / f"{head}-{seed}", args.epochs, seed=seed, mask_head=head,
                                           progress=False))["best"] for head in ("standard", "pointrend")}
        standard, pointrend = scores(best["standard"], data / "val"), scores(best["pointrend"], data / "val")
        coarse = scores(best["pointrend"], data / "val", coarse=True)
        found = (pointrend[:, 0] >= 0.5) & (coarse[:, 0] >= 0.5)
        gain = (pointrend[found] - coarse[found]).mean(0)
        rows.append(f"| {seed} | {summary(standard)} | {summary(pointrend)} | {gain[0]:+.3f} / {gain[1]:+.3f} |")
        print(rows[-1], flush=True)
    text = results_markdown(rows, args.epochs, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(text)
    if args.report:
        write_report(args.report, "PointRend: mask quality", "bench/pointrend_quality.py", sys.argv[1:],
                     f"{METHOD}\n\n{text}")


def results_markdown(rows: list[str], epochs: int, peak_mb: float) -> str:
    """This run's settings, its table (``rows``: one markdown row per seed) and peak RSS, as markdown."""
    return "\n".join([f"{epochs} epochs per training.", "",
                      "| seed | standard: IoU / Boundary IoU / found | pointrend: IoU / Boundary IoU / found "
                      "| subdivision gain: IoU / Boundary IoU |", "| --- | --- | --- | --- |", *rows, "",
                      f"Peak RSS of the run: {peak_mb:.0f} MB."])


if __name__ == "__main__":
    main()
