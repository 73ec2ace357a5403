"""The few things training needs of ``torch.distributed``: joining torchrun's group, agreeing, waiting."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins torchrun's process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def agree(flag: bool, world: int) -> bool:
    """Rank 0's decision, on every rank (only rank 0 evaluates, so only it knows when to stop)."""
    if world > 1:
        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])
    return flag


def barrier(world: int) -> None:
    """Wait for every process (nothing to wait for alone)."""
    if world > 1:
        dist.barrier()


def pick_device(name: str | None, local_rank: int) -> torch.device:
    """``name``, else this process's GPU, else the CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
