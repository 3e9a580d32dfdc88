"""torch.distributed as launched by torchrun: join the process group, shard the data, write on rank 0.

bntool adds no cluster layer of its own: `torchrun --nproc-per-node N -m bntool recalibrate ...` sets the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) that `process_group` reads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(device: str = "cpu", timeout_s: float = 600) -> Iterator[Rank]:
    """Join (and afterwards leave) the process group torchrun describes; a single process yields rank 0 of 1.
    CPU tensors use gloo, CUDA tensors nccl; each rank takes the GPU of its LOCAL_RANK."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # the caller's own group
        yield Rank(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return
    if not launched_by_torchrun():
        yield Rank()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield Rank(dist.get_rank(), dist.get_world_size(), local_rank)
    finally:
        dist.destroy_process_group()


def rank_device(device: str, rank: Rank) -> str:
    """'cuda' means this rank's own GPU under torchrun."""
    return f"cuda:{rank.local_rank}" if device == "cuda" and rank.world_size > 1 else device
