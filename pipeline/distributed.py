"""torch.distributed set-up shared by the stages: initialise from the launcher's environment, always clean up."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from pipeline.ranks import discover_ranks, use_local_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistInfo:
    """Rank and world size of this process (0 / 1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo(0, 1)


@contextlib.contextmanager
def distributed_from_env() -> Iterator[DistInfo]:
    """Initialise a process group when started in several processes (torchrun, deepspeed, mpirun, srun: see
    ``pipeline.ranks``), and on exit destroy any process group created inside (here or by a stage). One that
    already existed is left alone."""
    ranks = discover_ranks()
    existed = dist.is_initialized()
    if ranks.world_size > 1 and not existed:
        use_local_device(ranks)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    try:
        yield current()
    finally:
        if not existed and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (no-op in a single process)."""
    if current().world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if current().world_size > 1:
        dist.barrier()


def broadcast_from_main(obj):
    """``obj`` as rank 0 has it, on every rank (``obj`` itself in a single process); a picklable object."""
    if current().world_size > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process); a picklable object. Also a barrier."""
    if current().world_size > 1:
        gathered = [None] * current().world_size
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]
