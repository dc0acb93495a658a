"""torch.distributed set-up shared by the stages: initialise from the launcher's environment, always clean up."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from pipeline.errors import LayerMoEError
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


def collective_device() -> torch.device:
    """Where a tensor for a collective must be: this rank's GPU under NCCL, else the CPU."""
    if current().world_size > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


MAIN_ONLY_TIMEOUT = timedelta(hours=12)


def run_on_main(work: Callable[[], Any], others: Any) -> Any:
    """``work()`` on rank 0 while the other ranks wait and return ``others``. The waiting is a barrier of a gloo
    group with a long timeout (``MAIN_ONLY_TIMEOUT``), so that long single-rank work (e.g. harness tasks) does not
    trip the default collective timeout (10 minutes under NCCL)."""
    if current().world_size == 1:
        return work()
    group = dist.new_group(backend="gloo", timeout=MAIN_ONLY_TIMEOUT)
    try:
        result = work() if current().is_main else others
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)
    return result


def raise_if_failed_anywhere(error: BaseException | None, what: str) -> None:
    """Collective (every rank calls it): raise ``error`` on the rank that had it, and on the others an error that
    ``what`` failed on another rank, so that no rank waits at a later barrier for one that stopped."""
    failed = all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], device=collective_device()))
    if error is not None:
        raise error
    if float(failed) > 0:
        raise LayerMoEError(f"{what} failed on another rank (its message says why)")
