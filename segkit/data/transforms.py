"""Named augmentation presets (albumentations 2) that turn an image and its instance masks into
torchvision's Mask R-CNN input: ``(image float (3, H, W) in [0, 1], target dict)``.

Masks are the truth: geometric transforms move the masks, and the boxes are recomputed from the
transformed masks, so a box never disagrees with its mask after a crop or a rotation. There is no
fixed resize and no mean/std normalisation here: Mask R-CNN's GeneralizedRCNNTransform does both
inside the model, so a crop that changes the image size is fine (the model zooms it back).
"""
from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch

PRESETS = ("none", "light", "default", "heavy")


def _augmentations(preset: str) -> list[A.BasicTransform]:
    """The albumentations steps of one preset, mildest first."""
    if preset == "none":
        return []
    if preset == "light":
        return [A.HorizontalFlip(p=0.5)]
    if preset == "default":
        return [
            A.HorizontalFlip(p=0.5),
            # a random crop without resize: up to 15% off each side keeps 50-100% of the area;
            # the model's own resize then turns the crop into a zoom
            A.RandomCropFromBorders(crop_left=0.15, crop_right=0.15, crop_top=0.15, crop_bottom=0.15, p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5), p=1.0), A.GaussNoise(std_range=(0.01, 0.04), p=1.0)], p=0.2),
        ]
    if preset == "heavy":
        return [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            # masks use nearest-neighbour interpolation (Affine's default), so they stay binary
            A.Affine(scale=(0.75, 1.25), translate_percent=(-0.05, 0.05), rotate=(-20, 20), shear=(-5, 5), p=0.5),
            A.RandomCropFromBorders(crop_left=0.2, crop_right=0.2, crop_top=0.2, crop_bottom=0.2, p=0.5),
            A.ColorJitter(brightness=0.35, contrast=0.35, saturation=0.35, hue=0.05, p=0.9),
            A.GaussNoise(std_range=(0.02, 0.08), p=0.3),
            A.GaussianBlur(blur_limit=(3, 7), p=0.2),
            A.ImageCompression(quality_range=(50, 95), p=0.3),
        ]
    raise ValueError(f"unknown augmentation preset {preset!r}; valid presets: {', '.join(PRESETS)}")


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy float32 boxes of (N, H, W) masks: x1 = first column, x2 = last column + 1.

    Every mask must be non-empty. (torchvision.ops.masks_to_boxes returns x2 = last column; COCO
    boxes cover whole pixels, hence the + 1.)
    """
    if len(masks) == 0:
        return np.zeros((0, 4), np.float32)
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # (N, H), (N, W)
    y1, x1 = rows.argmax(axis=1), cols.argmax(axis=1)
    y2 = masks.shape[1] - rows[:, ::-1].argmax(axis=1)
    x2 = masks.shape[2] - cols[:, ::-1].argmax(axis=1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


class SegmentationTransform:
    """One preset applied to ``(image, masks, labels)``; returns torchvision's ``(image, target)``.

    An instance is dropped, with its label, when the transform leaves it fewer than ``min_area``
    pixels or less than ``min_visibility`` of the pixels it had before (a sliver at a crop border is
    not a recognisable object). An image left without instances is a valid negative.
    """

    def __init__(self, preset: str = "default", train: bool = True, min_area: int = 16,
                 min_visibility: float = 0.2, seed: int | None = None):
        steps = _augmentations(preset)  # validates the name even when train is False
        self.preset = preset if train else "none"
        self.min_area = min_area
        self.min_visibility = min_visibility
        self.augment = A.Compose(steps if train else [], seed=seed)
        self._worker_seed: int | None = None

    def _reseed_in_worker(self) -> None:
        # DataLoader workers receive a copy of the same albumentations generator: without a
        # reseed every worker would draw the same augmentations. torch gives each worker (and
        # each epoch) its own seed; use it.
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.augment.set_random_seed(info.seed % 2**32)

    def __call__(self, image: np.ndarray, masks: np.ndarray | Sequence[np.ndarray], labels: Sequence[int],
                 image_id: int = 0) -> tuple[torch.Tensor, dict]:
        """Augment an HxWx3 uint8 image with its (N, H, W) uint8 masks and N labels.

        Returns the image as float32 (3, H', W') in [0, 1] and the target {"boxes" float32 (N', 4)
        xyxy, "labels" int64 (N',), "masks" uint8 (N', H', W'), "image_id" int, "area" float32
        (mask pixels), "iscrowd" int64}.
        """
        self._reseed_in_worker()
        h, w = image.shape[:2]
        masks = np.asarray(masks, dtype=np.uint8).reshape(-1, h, w)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(masks) != len(labels):
            raise ValueError(f"{len(masks)} masks but {len(labels)} labels")
        if len(masks):
            out = self.augment(image=image, masks=masks)
            image, new_masks = out["image"], np.asarray(out["masks"], dtype=np.uint8)
        else:
            image, new_masks = self.augment(image=image)["image"], None
        h, w = image.shape[:2]
        if new_masks is None:
            new_masks = np.zeros((0, h, w), np.uint8)
        new_masks = (new_masks.reshape(-1, h, w) > 0).astype(np.uint8)
        area = new_masks.sum(axis=(1, 2))
        keep = (area >= self.min_area) & (area >= self.min_visibility * masks.sum(axis=(1, 2)))
        new_masks, labels, area = new_masks[keep], labels[keep], area[keep]
        target = {
            "boxes": torch.from_numpy(masks_to_boxes(new_masks)),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(np.ascontiguousarray(new_masks)),
            "image_id": int(image_id),
            "area": torch.from_numpy(area.astype(np.float32)),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),  # crowd regions are not trained on
        }
        # scale in numpy: torch's multi-threaded casts of a permuted view are slow on busy CPUs
        chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        return torch.from_numpy(np.divide(chw, 255, out=chw)), target

    def semantic(self, image: np.ndarray, class_map: np.ndarray, image_id: int = 0) -> tuple[torch.Tensor, dict]:
        """The same preset on an image and its (H, W) uint8 class map (:mod:`segkit.data.class_map`), for
        ``--task semantic``: returns the image as above and the target {"semantic" int64 (H', W'),
        "image_id" int}. The map moves with the image (nearest neighbour); pixels an affine transform
        brings in from outside the image are background.
        """
        self._reseed_in_worker()
        out = self.augment(image=image, mask=class_map)
        chw = np.ascontiguousarray(out["image"].transpose(2, 0, 1), dtype=np.float32)
        target = {"semantic": torch.from_numpy(np.asarray(out["mask"], dtype=np.int64)), "image_id": int(image_id)}
        return torch.from_numpy(np.divide(chw, 255, out=chw)), target

    def __repr__(self) -> str:
        return (f"SegmentationTransform(preset={self.preset!r}, min_area={self.min_area}, "
                f"min_visibility={self.min_visibility})")


def build_transform(preset: str = "default", train: bool = True, **kwargs) -> SegmentationTransform:
    """The named preset (one of :data:`PRESETS`) for training, or the plain conversion when ``train`` is False."""
    return SegmentationTransform(preset, train=train, **kwargs)
