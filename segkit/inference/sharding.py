"""Prediction under ``torchrun``: which rank predicts which images, on which device, with how many threads.

``torchrun --nproc-per-node N -m segkit predict ...`` starts N copies of ``segkit predict``; torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) tells each which it is. The
ranks need no more than a barrier from torch.distributed (gloo, also between GPU ranks: only a
handshake goes through it, never a tensor), so a run across machines is ``--nnodes``/``--rdzv-*`` as
for training, with the output folder on storage every machine sees.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Rank 0 waits at the last barrier for the slowest rank's share of the images, which on a big folder
# takes hours: torch's default 30 minutes would kill a healthy run. A rank that dies is noticed by
# torchrun, which stops the others, so a long timeout never hangs a failed run.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's: ``rank`` of ``world``, ``local_rank`` of ``local_world`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls) -> "Ranks":
        """What torchrun's environment says; one process of one without it."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                   int(env.get("LOCAL_WORLD_SIZE", 1)))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def join(self) -> None:
        """Join torchrun's process group (a no-op for one process, or when already joined)."""
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)

    def from_rank0(self, compute: Callable[[], T]) -> T:
        """``compute()`` run by rank 0 alone, its result sent to every rank (pickled, through gloo)."""
        box = [compute() if self.rank == 0 else None]
        if self.distributed:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            dist.barrier()

    def leave(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def shard(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's share: every ``world``-th item from its rank on, so shares differ by one item at most.

    Every rank must pass the same list in the same order (a sorted file list, less what is done).
    """
    return list(items[ranks.rank::ranks.world])


def rank_device(ranks: Ranks) -> torch.device:
    """``cuda:<local rank>`` where there is CUDA, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
        return torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_threads(ranks: Ranks, requested: int | None = None) -> int | None:
    """Threads for this process's CPU kernels: ``requested``, or this machine's cores split between its
    ranks under torchrun (which sets OMP_NUM_THREADS=1 for every rank by default and leaves cores idle),
    or None for one process: torch's own default."""
    if requested is not None:
        return max(1, requested)
    if ranks.local_world > 1:
        return max(1, len(os.sched_getaffinity(0)) // ranks.local_world)
    return None
