"""Training the click-refinement head (:class:`segkit.models.refiner.ClickRefiner`) on a trained model's frozen
features, with simulated annotators' clicks as RITM trains (Sofiiuk et al., "Reviving Iterative Training with
Mask Guidance for Interactive Segmentation", 2021).

Each training object is seen in its ground-truth box, jittered: the detector's features are pooled there
once, before training, together with the mask head's own mask (where a first answer comes from) and the
object's mask in the RoI's frame. A step then starts from the mask head's mask (or from nothing, as a click
on an object nobody detected does), adds a few clicks without gradient, each at the farthest point inside
the larger error (:func:`next_click`), feeding the head's answer back as the previous mask, and learns from
the answer to one more click. The detector is never changed, so this takes minutes on a CPU.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import resize_boxes

from segkit.data.dataset import SegmentationDataset
from segkit.models.forward import image_tensors, mask_probs
from segkit.tasks.checkpoint import model_from_checkpoint
from segkit.models.refiner import ClickRefiner, click_maps, image_in_grid, mask_in_grid, refiner_state, with_clicks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefinerConfig:
    """How the head trains: ``steps`` of ``batch`` objects, at most ``rounds`` fed-back clicks before the
    one learned from, box ``jitter`` (fraction of the side, per edge), ``jitters`` boxes per object."""

    steps: int = 500
    batch: int = 16
    lr: float = 1e-3
    rounds: int = 4
    jitter: float = 0.15
    jitters: int = 3
    empty_start: float = 0.2  # share of objects starting from no mask: a click on an object nobody detected
    corrupt_start: float = 0.4  # share starting from the truth spoiled (grown, shrunk, a false block, a part cut):
    # the mask head's own mistakes on its train split are too few and too small to learn large corrections from
    max_objects: int = 3000  # objects x jitters kept (pooled features are 400 KB each)
    seed: int = 0


@dataclass
class Samples:
    """The frozen model's view of every training object: pooled features, the mask head's mask and the truth."""

    pooled: Tensor  # (n, C, 28, 28) float16
    image: Tensor  # (n, 3, G, G) float16: the model's input in the RoI
    start: Tensor  # (n, 1, G, G) the mask head's probabilities, resampled to the grid
    truth: Tensor  # (n, 1, G, G) bool: the object's mask in its RoI's frame

    def __len__(self) -> int:
        return len(self.truth)


def next_click(mask: np.ndarray, truth: np.ndarray) -> tuple[tuple[float, float], bool] | None:
    """The simulated annotator's next click ((x, y), positive) on ``mask`` against ``truth`` (bool arrays):
    at the point farthest from the edge of the larger error, positive in a missed area, negative in a false
    one (RITM's clicker; the array's border counts as an edge). None when the mask is exact."""
    best = None
    for positive, error in ((True, truth & ~mask), (False, mask & ~truth)):
        if not error.any():
            continue
        inside = cv2.distanceTransform(np.pad(error, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
        if best is None or inside.max() > best[0]:
            best = (float(inside.max()), positive, inside)
    if best is None:
        return None
    _, positive, inside = best
    y, x = np.unravel_index(int(inside.argmax()), inside.shape)
    return (x + 0.5, y + 0.5), positive


@torch.no_grad()
def collect_samples(model: torch.nn.Module, dataset: SegmentationDataset, refiner: ClickRefiner,
                    cfg: RefinerConfig, device: torch.device) -> Samples:
    """Pool the frozen ``model``'s features over each object of ``dataset`` in ``cfg.jitters`` jittered boxes
    (the first exact); ``dataset`` is read without augmentation."""
    generator = torch.Generator().manual_seed(cfg.seed)
    pooled, crops, start, truth = [], [], [], []
    for i in range(len(dataset)):
        image, masks, labels = dataset.load(i)
        if len(masks) == 0:
            continue
        tensor = image_tensors([image], device)[0]
        batch, _ = model.transform([tensor])
        features = model.backbone(batch.tensors)
        size, original = batch.image_sizes[0], tuple(tensor.shape[-2:])
        boxes, classes, objects = _jittered_boxes(masks, labels, cfg, generator)
        model_boxes = resize_boxes(boxes.to(device), original, size)
        pooled.append(refiner.pooled(features, [model_boxes], [size]).half().cpu())
        crops.append(image_in_grid(batch.tensors, model_boxes, refiner.grid).half().cpu())
        probs = mask_probs(model.roi_heads, features, [model_boxes], [classes.to(device)], [size])[0]
        start.append(F.interpolate(probs.float(), size=(refiner.grid, refiner.grid), mode="bilinear",
                                   align_corners=False).cpu())
        full = torch.from_numpy(np.ascontiguousarray(masks))
        truth.append(torch.stack([mask_in_grid(full[k], (0, 0), box.tolist(), refiner.grid) > 0.5
                                  for k, box in zip(objects, boxes)])[:, None])
        if sum(len(p) for p in pooled) >= cfg.max_objects:
            break
    if not pooled:
        raise ValueError("no objects to train the refinement head on")
    n = cfg.max_objects
    return Samples(torch.cat(pooled)[:n], torch.cat(crops)[:n], torch.cat(start)[:n], torch.cat(truth)[:n])


def _jittered_boxes(masks: np.ndarray, labels: np.ndarray, cfg: RefinerConfig,
                    generator: torch.Generator) -> tuple[Tensor, Tensor, list[int]]:
    """(boxes (n, 4), classes, object index of each box): each object's box, then ``jitters - 1`` moved copies."""
    boxes, classes, objects = [], [], []
    height, width = masks.shape[1:]
    for k, (mask, label) in enumerate(zip(masks, labels)):
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        for j in range(cfg.jitters):
            shift = (torch.rand(4, generator=generator) * 2 - 1) * cfg.jitter if j else torch.zeros(4)
            w, h = x1 - x0, y1 - y0
            box = [x0 + shift[0] * w, y0 + shift[1] * h, x1 + shift[2] * w, y1 + shift[3] * h]
            box = [min(max(box[0], 0), width - 1), min(max(box[1], 0), height - 1),
                   min(max(box[2], box[0] + 1), width), min(max(box[3], box[1] + 1), height)]
            boxes.append(box)
            classes.append(int(label))
            objects.append(k)
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(classes), objects


def starting_masks(start: Tensor, truth: Tensor, cfg: RefinerConfig, rng: np.random.Generator) -> Tensor:
    """(n, 1, G, G) binary masks to start from: the mask head's, or none (``cfg.empty_start``), or the truth
    spoiled (``cfg.corrupt_start``; :func:`spoiled`)."""
    masks = (start > 0.5).float()
    draw = rng.random(len(masks))
    for k in range(len(masks)):
        if draw[k] < cfg.empty_start:
            masks[k] = 0
        elif draw[k] < cfg.empty_start + cfg.corrupt_start:
            masks[k, 0] = spoiled(truth[k, 0], rng)
    return masks


def spoiled(truth: Tensor, rng: np.random.Generator) -> Tensor:
    """``truth`` (G, G bool) with one or two of: grown or shrunk by a few cells, a false block added, the part
    beyond a random line cut away: the kinds of mistake annotators click on."""
    mask = truth.float()
    grid = mask.shape[-1]
    for kind in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
        if kind == 0:  # grown
            k = 2 * int(rng.integers(1, 5)) + 1
            mask = F.max_pool2d(mask[None, None], k, 1, k // 2)[0, 0]
        elif kind == 1:  # shrunk
            k = 2 * int(rng.integers(1, 5)) + 1
            mask = -F.max_pool2d(-mask[None, None], k, 1, k // 2)[0, 0]
        elif kind == 2:  # a false block
            w, h = rng.integers(grid // 6, grid // 2, size=2)
            x, y = rng.integers(0, grid - w), rng.integers(0, grid - h)
            mask[y:y + h, x:x + w] = 1
        else:  # cut beyond a line through a random point
            angle, (cx, cy) = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.8, size=2) * grid
            ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
            mask = mask * (((xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)) < 0).float()
    return mask


def simulate(refiner: ClickRefiner, pooled: Tensor, image: Tensor, previous: Tensor, truth: Tensor,
             clicks: list[list], rounds: int) -> tuple[Tensor, Tensor]:
    """``rounds`` clicks, each answered by the head and fed back; returns (click maps, previous mask) for the
    next answer. ``clicks`` holds each object's clicks so far (x, y, positive) in grid cells; it grows."""
    for r in range(rounds + 1):
        guess = (previous[:, 0] > 0.5).cpu().numpy()
        gt = truth[:, 0].cpu().numpy()
        for k in range(len(clicks)):
            click = next_click(guess[k], gt[k])
            if click is not None:
                (x, y), positive = click
                clicks[k].append((x, y, positive))
        maps = torch.stack([click_maps(c, refiner.grid) for c in clicks]).to(pooled.device)
        if r == rounds:
            return maps, previous
        with torch.no_grad():
            answer = torch.sigmoid(refiner(pooled, image, maps, previous))
            # as served: each click's disk as asked, then cut at 0.5 (the annotator sees a binary mask)
            previous = torch.stack([with_clicks(a, c) for a, c in zip(answer, clicks)])
            previous = (previous > 0.5).float()
    raise AssertionError("unreachable")


def refiner_loss(logits: Tensor, truth: Tensor) -> Tensor:
    """Binary cross-entropy plus one minus the soft IoU, per object, averaged."""
    target = truth.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probs = torch.sigmoid(logits)
    inter = (probs * target).flatten(1).sum(1)
    union = (probs + target - probs * target).flatten(1).sum(1)
    return bce + (1 - (inter + 1) / (union + 1)).mean()


def train_refiner(model: torch.nn.Module, dataset: SegmentationDataset, cfg: RefinerConfig = RefinerConfig(),
                  device: torch.device | str = "cpu", progress=None) -> tuple[ClickRefiner, dict]:
    """A :class:`ClickRefiner` trained on ``dataset``'s objects over the frozen ``model`` (eval mode, unchanged),
    and what its training did: ``objects``, ``steps``, ``seconds``, ``loss_first`` / ``loss_last`` (means of the
    first and last tenth of the steps). ``progress(step, loss)`` is called after each step."""
    if cfg.steps < 1 or cfg.batch < 1:
        raise ValueError(f"the refinement head needs at least one step of one object (got {cfg.steps} steps of "
                         f"{cfg.batch})")
    device = torch.device(device)
    model = model.eval().to(device)
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    heads = model.roi_heads
    names = getattr(getattr(heads, "mask_roi_pool", None), "featmap_names", None) or ["0", "1", "2", "3"]
    channels = getattr(model.backbone, "out_channels", 256)
    refiner = ClickRefiner(channels, names).to(device)
    samples = collect_samples(model, dataset, refiner, cfg, device)
    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.AdamW(refiner.parameters(), lr=cfg.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    losses = []
    refiner.train()
    for step in range(cfg.steps):
        idx = torch.from_numpy(rng.choice(len(samples), size=min(cfg.batch, len(samples)), replace=False))
        pooled, truth = samples.pooled[idx].float().to(device), samples.truth[idx].to(device)
        image = samples.image[idx].float().to(device)
        previous = starting_masks(samples.start[idx], samples.truth[idx], cfg, rng).to(device)
        rounds = int(rng.integers(0, cfg.rounds + 1))
        maps, previous = simulate(refiner, pooled, image, previous, truth, [[] for _ in idx], rounds)
        loss = refiner_loss(refiner(pooled, image, maps, previous), truth)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    refiner.eval()
    tenth = max(1, cfg.steps // 10)
    stats = {"objects": len(samples), "steps": cfg.steps, "seconds": round(time.monotonic() - started, 1),
             "loss_first": float(np.mean(losses[:tenth])), "loss_last": float(np.mean(losses[-tenth:]))}
    log.info("refinement head: %s", stats)
    return refiner.cpu(), stats


def add_refiner(ckpt: dict, dataset: SegmentationDataset, cfg: RefinerConfig = RefinerConfig(),
                device: torch.device | str = "cpu", progress=None) -> dict:
    """``ckpt`` (a loaded instance checkpoint) with a refinement head trained on ``dataset``'s objects under
    ``"refiner"``: its config, weights and training stats (see :func:`train_refiner`). Raises ``ValueError``
    for a model that has no mask head to refine."""
    if (ckpt.get("task") or "instance") != "instance":
        raise ValueError(f"the refinement head corrects Mask R-CNN masks; this checkpoint is a {ckpt['task']} model")
    model = model_from_checkpoint(ckpt)
    refiner, stats = train_refiner(model, dataset, cfg, device, progress)
    return {**ckpt, "refiner": refiner_state(refiner, **stats, seed=cfg.seed)}
