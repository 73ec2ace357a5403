"""Torch datasets over :class:`~segkit.data.records.ImageRecord` lists.

Images are numbered by their index in the list: ``target["image_id"] == i`` is image ``i`` of
:func:`segkit.evaluation.coco.records_to_coco`, so predictions and ground truth meet in pycocotools' COCOeval.
Labels come from :func:`segkit.data.records.label_map`; 0 is the background, as torchvision expects.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from segkit.data.class_map import class_map
from segkit.data.images import load_image
from segkit.data.records import ImageRecord, Instance, label_map
from segkit.data.tiling import crop_generator, crop_instances, random_window
from segkit.data.transforms import build_transform

Transform = Callable[..., tuple[torch.Tensor, dict]]


def _trainable(inst: Instance) -> bool:
    # a box without a mask cannot teach the mask head; crowd regions are evaluation-only (as in detectron2)
    return inst.segmentation is not None and not inst.iscrowd


class SegmentationDataset(torch.utils.data.Dataset):
    """Images with their instance masks, augmented by ``transform`` into torchvision's (image, target);
    with ``tile``, a random crop of that many pixels at native resolution of each (:mod:`segkit.data.tiling`),
    the same for the same image and :meth:`set_epoch` whatever the workers or a resume skipped."""

    def __init__(self, images: Sequence[ImageRecord], classes: Sequence[str], transform: Transform | None = None,
                 tile: int | None = None):
        self.images = list(images)
        self.classes = list(classes)
        self.transform = transform if transform is not None else build_transform("none", train=False)
        self.tile = tile
        self.epoch_seed = 0
        self._labels = label_map(self.classes)

    def set_epoch(self, epoch_seed: int) -> None:
        """Draw this epoch's crops from ``epoch_seed``."""
        self.epoch_seed = epoch_seed

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image ``i`` before augmentation: HxWx3 uint8 RGB, (N, H, W) uint8 masks, (N,) int64 labels."""
        rec = self.images[i]
        if self.tile:
            return self._load_tile(rec, crop_generator(self.epoch_seed, i))
        image = np.asarray(load_image(rec.path))
        h, w = image.shape[:2]
        instances = [inst for inst in rec.instances if _trainable(inst)]
        masks = np.zeros((len(instances), h, w), np.uint8)
        for k, inst in enumerate(instances):
            mask = inst.mask(h, w)
            if mask.shape != (h, w):  # an RLE keeps its own size: it was drawn on another image
                raise ValueError(f"{rec.path}: a {inst.label!r} mask is {mask.shape}, the image {(h, w)}")
            masks[k] = mask
        return image, masks, self._label_array(rec, instances)

    def _load_tile(self, rec: ImageRecord, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        photo = load_image(rec.path)
        instances = [inst for inst in rec.instances if _trainable(inst)]
        for inst in instances:  # an RLE keeps its own size: it was drawn on another image
            size = inst.segmentation.get("size") if isinstance(inst.segmentation, dict) else None
            if size is not None and tuple(size) != (photo.height, photo.width):
                raise ValueError(f"{rec.path}: a {inst.label!r} mask is {tuple(size)}, the image "
                                 f"{(photo.height, photo.width)}")
        window = random_window(instances, photo.width, photo.height, self.tile, generator)
        instances, masks = crop_instances(instances, window, photo.width, photo.height)
        return np.asarray(photo.crop(window)), masks, self._label_array(rec, instances)

    def _label_array(self, rec: ImageRecord, instances: list[Instance]) -> np.ndarray:
        try:
            return np.array([self._labels[inst.label] for inst in instances], np.int64)
        except KeyError as err:
            raise KeyError(f"{rec.path}: class {err.args[0]!r} is not one of {self.classes}") from None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        image, masks, labels = self.load(i)
        return self.transform(image, masks, labels, image_id=i)


class SemanticDataset(SegmentationDataset):
    """Images with their class maps (``--task semantic``): ``(image, {"semantic": (H, W) int64, "image_id": i})``."""

    def load_class_map(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``i`` before augmentation: HxWx3 uint8 RGB and its (H, W) uint8 class map."""
        rec = self.images[i]
        image = np.asarray(load_image(rec.path))
        return image, class_map(rec, self.classes, *image.shape[:2])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        image, classes = self.load_class_map(i)
        return self.transform.semantic(image, classes, image_id=i)


def collate_fn(batch: Sequence[tuple]) -> tuple:
    """Keep images and targets as tuples: detection models take lists of differently sized images."""
    return tuple(zip(*batch))
