"""Does PointRend outline objects better than the standard head? Both trained the same way, side by side.

For each seed, trains the standard and the PointRend head with the tests' overfit recipe (4 sample images at
128 px, random init, ``tests.helpers.overfit_config``), then scores each ground-truth instance against its
best same-class prediction at the image's own size: mean mask IoU, mean Boundary IoU, instances found
(IoU >= 0.5). The last columns are the PointRend model's own 224 x 224 renders against its 28 x 28 coarse
masks on the same detections: what the point head adds, apart from which instances a run finds.

    python -m bench.pointrend_quality [--seeds 0 1 2] [--epochs 50] [--out runs/bench-pointrend]

This was a test once; it measures a training outcome, which moves with the seed, the CPU's kernels and the
thread count by more than the heads differ (README, "Sharper masks: PointRend"), so it reports instead.
"""
from __future__ import annotations

import argparse
import resource
from pathlib import Path

import numpy as np

from segkit.inference.predictor import Predictor
from segkit.engine.trainer import train
from tests.helpers import SAMPLE, TINY_IMAGES, instance_scores, overfit_config, write_subset


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
    args = p.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not data.exists():
        write_subset(SAMPLE / "train", data, 4, names=TINY_IMAGES)
    print("| seed | standard: IoU / Boundary IoU / found | pointrend: IoU / Boundary IoU / found "
          "| subdivision gain: IoU / Boundary IoU |")
    print("| --- | --- | --- | --- |")
    for seed in args.seeds:
        best = {head: train(overfit_config(data, out / f"{head}-{seed}", args.epochs, seed=seed, mask_head=head,
                                           progress=False))["best"] for head in ("standard", "pointrend")}
        standard, pointrend = scores(best["standard"], data / "val"), scores(best["pointrend"], data / "val")
        coarse = scores(best["pointrend"], data / "val", coarse=True)
        found = (pointrend[:, 0] >= 0.5) & (coarse[:, 0] >= 0.5)
        gain = (pointrend[found] - coarse[found]).mean(0)
        print(f"| {seed} | {summary(standard)} | {summary(pointrend)} | {gain[0]:+.3f} / {gain[1]:+.3f} |",
              flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
