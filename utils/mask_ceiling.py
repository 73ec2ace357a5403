"""Would sharper masks help on your data? The best a mask grid, and the model's input size, allow.

    python utils/mask_ceiling.py --data export [--split val] [--img-size 512] [--grids 28 224]

Each ground-truth instance is scored against itself after one of two losses of detail, at the
image's own size (mask IoU and Boundary IoU, mean and lowest over the instances):

* ``grid S``: resampled onto S x S cells over its box, as a mask head predicts it, and resampled
  back with exact sub-pixel geometry: what the grid itself can hold. 28 is Mask R-CNN's head; 224 is
  PointRend's default render. (segkit pastes predictions as torchvision does, rounding the box to
  whole pixels: on the sample's perfect masks that costs 0.016 mean IoU more at 28 x 28 and 0.03 at
  224 x 224, on trained models' masks it was measured within 0.001.);
* ``input``: shrunk to the size the model sees at ``--img-size`` and enlarged back: the detail the
  model's input holds at all.

If the 28 x 28 row is already close to 1, or the input row is far below it, the standard head is not
what limits your masks and ``--mask-head pointrend`` has little to add (raise ``--img-size`` first).
PointRend is worth trying when the 28 x 28 row falls clearly below the 224 and input rows: objects
large in the model's input, with detail finer than a 28th of their size.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from segkit.evaluation.boundary import boundary_iou
from segkit.models.mask_rcnn import image_size_kwargs
from segkit.models.pointrend import point_sample
from segkit.data.readers import load_dataset


def through_grid(mask: np.ndarray, size: int) -> np.ndarray:
    """``mask`` resampled onto ``size`` x ``size`` cells over its box and back, cut at 0.5."""
    ys, xs = np.nonzero(mask)
    (x0, y0), (x1, y1) = (xs.min(), ys.min()), (xs.max() + 1, ys.max() + 1)
    box = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32)
    # aligned: pixel i covers [i, i + 1), as in point_sample below
    cells = roi_align(torch.from_numpy(mask)[None, None].float(), [box], (size, size), 1.0, sampling_ratio=2,
                      aligned=True)
    px = (torch.arange(mask.shape[1]) + 0.5 - x0) / (x1 - x0)  # pixel centres, box-relative
    py = (torch.arange(mask.shape[0]) + 0.5 - y0) / (y1 - y0)
    points = torch.stack(torch.meshgrid(py, px, indexing="ij")[::-1], dim=-1).reshape(1, -1, 2)
    return (point_sample(cells, points) > 0.5).reshape(mask.shape).numpy()


def through_input(mask: np.ndarray, img_size: int) -> np.ndarray:
    """``mask`` at the model's input size for ``img_size`` (its own resize rule), and back."""
    h, w = mask.shape
    limits = image_size_kwargs(img_size)
    scale = min(limits["min_size"] / min(h, w), limits["max_size"] / max(h, w))
    small = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(round(h * scale), round(w * scale)),
                          mode="area")
    return (F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0.5).numpy()


def ceilings(data: Path, split: str, img_size: int, grids: list[int]) -> dict[str, np.ndarray]:
    """{row name: (instances, 2) array of (mask IoU, Boundary IoU)} over every instance of ``split``."""
    rows = {f"grid {s} x {s}": [] for s in grids} | {f"input at --img-size {img_size}": []}
    for record in load_dataset(data / split).images:
        for instance in record.instances:
            mask = instance.mask(record.height, record.width).astype(bool)
            if not mask.any():
                continue
            variants = [through_grid(mask, s) for s in grids] + [through_input(mask, img_size)]
            for name, got in zip(rows, variants):
                iou = (got & mask).sum() / (got | mask).sum()
                rows[name].append((iou, boundary_iou(mask, got)))
    return {name: np.array(scores, dtype=float).reshape(-1, 2) for name, scores in rows.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder with <split>/ exports (e.g. data/sample)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--img-size", type=int, default=512, help="the training --img-size")
    parser.add_argument("--grids", type=int, nargs="+", default=[28, 224], help="mask grid sizes to compare")
    args = parser.parse_args(argv)
    rows = ceilings(args.data, args.split, args.img_size, args.grids)
    count = len(next(iter(rows.values())))
    print(f"{args.data / args.split}: {count} instances, each against itself at the image's own size")
    print(f"{'detail kept by':<28}{'mean IoU':>10}{'lowest':>8}{'mean Boundary IoU':>19}{'lowest':>8}")
    for name, scores in rows.items():
        mean, low = scores.mean(0), scores.min(0)
        print(f"{name:<28}{mean[0]:>10.3f}{low[0]:>8.3f}{mean[1]:>19.3f}{low[1]:>8.3f}")


if __name__ == "__main__":
    main()
