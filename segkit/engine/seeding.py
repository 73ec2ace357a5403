"""Runs that repeat: an epoch depends only on (seed, epoch), and a resumed run continues the same streams."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch) alone, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, loader: DataLoader) -> None:
    """Make an epoch depend only on (seed, epoch): order, augmentation and the model's sampling."""
    epoch_seed = seed * 1000 + epoch
    seed_everything(epoch_seed)
    loader.generator.manual_seed(epoch_seed)  # worker seeds come from here, not from the model's stream
    loader.dataset.transform.augment.set_random_seed(epoch_seed)  # in-process loading; workers reseed
    loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):  # tiled training's crops
        loader.dataset.set_epoch(epoch_seed)


def rng_state() -> dict:
    """Every generator's state, as tensors and lists (a checkpoint loads with ``weights_only=True``)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
