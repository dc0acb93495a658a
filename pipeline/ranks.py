"""Rank discovery: this process's rank, world size and rendezvous, whichever launcher started it.

What each launcher tells a process, and what :func:`discover_ranks` makes of it (torch.distributed and
DeepSpeed then read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``):

* ``torchrun``, ``deepspeed``: all five variables, used as they are;
* ``mpirun`` (Open MPI, MPICH, Intel MPI): ``OMPI_COMM_WORLD_*`` / ``PMI_*`` / ``PMIX_RANK``; ranks come from
  mpi4py's ``COMM_WORLD``, and rank 0 picks the rendezvous address and a free port and broadcasts them;
* ``srun``: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; the rendezvous is derived without
  communication: the first host of ``SLURM_STEP_NODELIST``, a port from the job and step ids.

A rendezvous address the environment already names is kept unless it is loopback and the ranks span several
hosts; all ranks on one host always meet on 127.0.0.1. ``MASTER_PORT`` from the environment is kept.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch

LOOPBACK = "127.0.0.1"
MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")  # set by mpirun / mpiexec for each rank


@dataclass(frozen=True)
class Ranks:
    """This process's place in a multi-process run, and the launcher it was found from."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "env" (torchrun, deepspeed), "mpi", "slurm" or "none" (a plain single process)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def slurm_port(job_id: int, step_id: int) -> int:
    """A rendezvous port every task of a Slurm step computes alike (below Linux's ephemeral range)."""
    return 20000 + (job_id * 37 + step_id) % 12000


def _is_loopback(address: str) -> bool:
    return address == "localhost" or address == "::1" or address.startswith("127.")


def _rendezvous_address(one_host: bool, head_host: str) -> str:
    """The configured MASTER_ADDR unless it cannot work; else loopback on one host, the head host on several."""
    given = os.environ.get("MASTER_ADDR", "")
    if given and not (_is_loopback(given) and not one_host):
        return given
    return LOOPBACK if one_host else head_host


def _from_mpi() -> tuple[Ranks, str, int]:
    # Imported here, not at the top: importing mpi4py.MPI initialises MPI, which only an mpirun rank may do.
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = node.Get_rank()
    node.Free()
    hosts = world.allgather(socket.gethostname())
    rendezvous = None
    if world.Get_rank() == 0:
        address = _rendezvous_address(len(set(hosts)) == 1, hosts[0])
        port = int(os.environ.get("MASTER_PORT") or free_port(LOOPBACK if _is_loopback(address) else ""))
        rendezvous = (address, port)
    address, port = world.bcast(rendezvous, root=0)
    return Ranks(world.Get_rank(), world.Get_size(), local_rank, "mpi"), address, port


def _from_slurm() -> tuple[Ranks, str, int]:
    env = os.environ
    one_host = int(env.get("SLURM_STEP_NUM_NODES", "1")) == 1
    head = "" if one_host else subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]],
                                              capture_output=True, text=True, check=True).stdout.split()[0]
    port = int(env.get("MASTER_PORT") or slurm_port(int(env["SLURM_JOB_ID"]), int(env.get("SLURM_STEP_ID", "0"))))
    ranks = Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0")),
                  "slurm")
    return ranks, _rendezvous_address(one_host, head), port


def discover_ranks() -> Ranks:
    """Find rank, world size and rendezvous from whatever started this process, and export them as RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (nothing is exported for a plain single process).

    Safe to call again: once RANK and WORLD_SIZE are set they are what the next call reads."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, the DeepSpeed launcher, or an earlier call
        env.setdefault("MASTER_ADDR", LOOPBACK)
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), "env")
    if any(name in env for name in MPI_RANK_VARIABLES):  # before Slurm: mpirun inside an allocation
        ranks, address, port = _from_mpi()
    elif "SLURM_STEP_NUM_TASKS" in env:  # an srun task (a batch script itself has no SLURM_STEP_* variables)
        ranks, address, port = _from_slurm()
    else:
        return Ranks(0, 1, 0, "none")
    env.update(RANK=str(ranks.rank), WORLD_SIZE=str(ranks.world_size), LOCAL_RANK=str(ranks.local_rank),
               MASTER_ADDR=address, MASTER_PORT=str(port))
    return ranks


def use_local_device(ranks: Ranks) -> None:
    """On a GPU node, make this rank's default CUDA device the one of its local rank (a no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())
