"""The click-refinement head: a mask corrected by an annotator's clicks, from the detector's own features.

Mask R-CNN's mask head answers a box; when its mask is wrong, nothing the annotator clicks can change it.
:class:`ClickRefiner` takes, in one region of interest (RoI): the FPN features pooled at 28 x 28, the
model's input image there (outlines: a MobileNet FPN's finest map has a stride of 16 pixels), the positive
and negative clicks so far drawn as disks, and the previous mask, all on a ``grid`` x ``grid`` frame of the
RoI (56: twice the mask head's resolution), and predicts the corrected mask there. It learns the project's
own objects (:mod:`segkit.engine.refiner`, RITM-style click simulation on frozen features) and is saved in the
checkpoint under ``"refiner"``.

Frames: a RoI is a box (x0, y0, x1, y1) in image pixels; grid cell (i, j) covers [x0 + j * w / G, ...),
so an image point maps to ``((x - x0) * G / w, (y - y0) * G / h)`` (:func:`to_grid`). Masks go into the
grid with ``roi_align`` (as torchvision projects ground truth onto its mask head's boxes) and back with
:func:`segkit.models.forward.paste_masks`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, roi_align

GRID = 56  # side of the RoI frame the head predicts in
FEATURE_SIZE = 28  # side of the pooled features (upsampled x2 inside the head)
CLICK_RADIUS = 3  # grid cells: the disk a click is drawn as (RITM draws 5 px disks on its 320-480 px crops)
FORCED_RADIUS = 1.5  # grid cells set to a click's sign: the 4 cells the clicked pixel is interpolated from


class ClickRefiner(nn.Module):
    """Corrected mask logits (n, 1, G, G) from pooled RoI features (n, C, 28, 28), the normalized input image
    in the RoI (n, 3, G, G; :func:`image_in_grid`), click disks (n, 2, G, G: positive, negative) and the
    previous mask's probabilities (n, 1, G, G).

    Small on purpose (about 0.3 M parameters): it runs once per click on one RoI and trains in minutes on
    a CPU. The previous mask is binary, as the annotator saw it (a pasted mask cut at 0.5), in training too.
    """

    def __init__(self, in_channels: int = 256, featmap_names: Sequence[str] = ("0", "1", "2", "3"),
                 hidden: int = 64, grid: int = GRID):
        super().__init__()
        self.grid = grid
        self.in_channels = in_channels
        self.featmap_names = list(featmap_names)
        self.pool = MultiScaleRoIAlign(self.featmap_names, FEATURE_SIZE, sampling_ratio=2)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.inputs = nn.Sequential(nn.Conv2d(6, hidden // 2, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(hidden // 2, hidden // 2, 3, padding=1), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(
            nn.Conv2d(hidden + hidden // 2, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=4, dilation=4), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1))

    def pooled(self, features: dict[str, Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]) -> Tensor:
        """(n, C, 28, 28) features of ``boxes`` (per image, in the model's input pixels), from the FPN's maps."""
        return self.pool(features, boxes, image_sizes)

    def forward(self, pooled: Tensor, image: Tensor, clicks: Tensor, previous: Tensor) -> Tensor:
        x = self.features(pooled)
        x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        x = torch.cat([x, self.inputs(torch.cat([image, clicks, previous], 1))], 1)
        return self.fuse(x)

    def describe(self) -> dict[str, Any]:
        """What rebuilds it (:func:`refiner_from_state`), saved beside its weights."""
        return {"in_channels": self.in_channels, "featmap_names": self.featmap_names,
                "hidden": self.features[0].out_channels, "grid": self.grid}


def refiner_from_state(state: dict[str, Any], model: nn.Module) -> ClickRefiner:
    """The head saved as ``{"config": ..., "state_dict": ...}`` (a checkpoint's ``"refiner"`` entry) for the
    detector ``model``, in eval mode; ``ValueError`` saying what does not fit when it was made for another."""
    config = state.get("config") or {}
    channels = getattr(getattr(model, "backbone", None), "out_channels", None)
    pool = getattr(getattr(model, "roi_heads", None), "mask_roi_pool", None)
    names = set(getattr(pool, "featmap_names", []) or [])
    if config.get("in_channels") != channels or not set(config.get("featmap_names", [])) <= names:
        raise ValueError(f"its refinement head was made for {config.get('in_channels')} channels of feature maps "
                         f"{config.get('featmap_names')}; the detector has {channels} of {sorted(names)}")
    refiner = ClickRefiner(**config)
    try:
        refiner.load_state_dict(state["state_dict"])
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"its refinement head's weights do not load ({type(e).__name__}: {e})") from None
    return refiner.eval()


def refiner_state(refiner: ClickRefiner, **extra: Any) -> dict[str, Any]:
    """The checkpoint entry of ``refiner``: its config, weights and ``extra`` (how it was trained)."""
    return {"config": refiner.describe(), "state_dict": refiner.state_dict(), **extra}


def image_in_grid(image: Tensor, boxes: Tensor, grid: int) -> Tensor:
    """(n, 3, G, G) of the model's normalized input ``image`` (1, 3, h, w) over ``boxes`` (n, 4, its pixels)."""
    return roi_align(image, [boxes.to(image.dtype)], (grid, grid), 1.0, sampling_ratio=2, aligned=True)


def to_grid(points: Sequence[Sequence[float]], box: Sequence[float], grid: int) -> np.ndarray:
    """Image points (x, y) as (n, 2) coordinates of ``box``'s ``grid`` x ``grid`` frame."""
    x0, y0, x1, y1 = (float(v) for v in box)
    p = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    return np.stack([(p[:, 0] - x0) * grid / max(x1 - x0, 1e-6), (p[:, 1] - y0) * grid / max(y1 - y0, 1e-6)], 1)


def click_maps(clicks: Sequence[tuple[float, float, bool]], grid: int, radius: float = CLICK_RADIUS) -> Tensor:
    """(2, G, G) disks of ``radius`` cells around each click (x, y, positive), positive ones in channel 0,
    negative ones in 1 (grid coordinates, cell centres at i + 0.5)."""
    maps = torch.zeros(2, grid, grid)
    for x, y, positive in clicks:
        maps[0 if positive else 1][_disk(x, y, radius, grid, maps.device)] = 1.0
    return maps


def with_clicks(probs: Tensor, clicks: Sequence[tuple[float, float, bool]], radius: float = FORCED_RADIUS) -> Tensor:
    """``probs`` (..., G, G) with the cells around each click set to its sign (1 positive, 0 negative), in order,
    so the latest click wins: the clicked pixel is always answered as asked, whatever the head learned, and
    nothing much beyond it (a few cells: on a large object a wider disk would cut real parts). Clicks in grid
    coordinates, (x, y, positive)."""
    out = probs.clone()
    for x, y, positive in clicks:
        out[..., _disk(x, y, radius, probs.shape[-1], probs.device)] = 1.0 if positive else 0.0
    return out


def _disk(x: float, y: float, radius: float, grid: int, device: torch.device) -> Tensor:
    """(G, G) bool: the cells whose centres (i + 0.5) lie within ``radius`` of (x, y)."""
    centres = torch.arange(grid, dtype=torch.float32, device=device) + 0.5
    return (centres[None, :] - float(x)) ** 2 + (centres[:, None] - float(y)) ** 2 <= radius ** 2


def mask_in_grid(mask: Tensor, offset: tuple[int, int], box: Sequence[float], grid: int) -> Tensor:
    """(G, G) mean of ``mask`` (a float (h, w) map whose pixel (0, 0) is the image's ``offset`` (x, y)) over
    each cell of ``box``'s frame: how a mask enters the head, as torchvision projects ground truth."""
    x0, y0, x1, y1 = (float(v) for v in box)
    ox, oy = offset
    rois = torch.tensor([[0, x0 - ox, y0 - oy, x1 - ox, y1 - oy]], dtype=torch.float32, device=mask.device)
    return roi_align(mask[None, None].float(), rois, (grid, grid), 1.0, sampling_ratio=2, aligned=True)[0, 0]
