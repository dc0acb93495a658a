"""Starting stages in several processes: rank discovery for every launcher, and the DeepSpeed-launcher command.

What each launcher tells a process, and what :func:`discover_ranks` makes of it (torch.distributed and
DeepSpeed then read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``):

* ``torchrun``, ``deepspeed``: all five variables, used as they are;
* ``mpirun`` (Open MPI, MPICH, Intel MPI): ``OMPI_COMM_WORLD_*`` / ``PMI_*`` / ``PMIX_RANK``; ranks come from
  mpi4py's ``COMM_WORLD``, and rank 0 picks the rendezvous address and a free port and broadcasts them;
* ``srun``: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; the rendezvous is derived without
  communication: the first host of ``SLURM_STEP_NODELIST``, a port from the job and step ids.

A rendezvous address the environment already names is kept unless it is loopback and the ranks span several
hosts; all ranks on one host always meet on 127.0.0.1. ``MASTER_PORT`` from the environment is kept.

``python -m pipeline.launch`` is the command-line side used by ``slurm/expand.sh``: ``preflight`` checks a
config against the node, ``stage`` replaces itself with the DeepSpeed launcher for one node of a stage.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipeline import log
from pipeline.config import RunConfig
from pipeline.ds_config import deepspeed_config, precision
from pipeline.errors import LayerMoEError

LOOPBACK = "127.0.0.1"
STAGES_DIR = Path(__file__).resolve().parents[1] / "stages"
MULTI_PROCESS_STAGES = ("analyze", "train_stage1", "train_stage2")  # stages that split their work over ranks
MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")  # set by mpirun / mpiexec for each rank


class StageProcessesFailed(LayerMoEError):
    """A stage run in several processes exited with a non-zero status."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


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
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank % torch.cuda.device_count())


# ----------------------------------------------------------------------------------------------------------
# Running a stage in several processes through the DeepSpeed launcher
# ----------------------------------------------------------------------------------------------------------


def stage_entry(stage: str) -> list[str]:
    """The entry script of ``stage`` and its fixed arguments, e.g. ``[.../stages/train.py, --stage, 1]``."""
    if stage in ("train_stage1", "train_stage2"):
        return [str(STAGES_DIR / "train.py"), "--stage", stage[-1]]
    script = STAGES_DIR / f"{stage}.py"
    if not script.is_file():
        raise LayerMoEError(f"stage {stage!r} has no entry point {script}")
    return [str(script)]


def launch_stage_command(config_path: str | Path, stage: str, round_name: str | None = None,
                         overrides: Sequence[str] = (), processes_per_node: int = 1, *, nodes: int = 1,
                         node_rank: int = 0, master_addr: str = LOOPBACK, master_port: int | None = None,
                         hostfile: str | Path | None = None, force: bool = False) -> list[str]:
    """The DeepSpeed-launcher command that runs ``stage`` in ``processes_per_node`` processes on this node.

    On CPU ``--num_gpus`` is the number of processes. For several nodes, run the command once per node with
    its ``node_rank`` (``--no_ssh``: no launcher reaches other nodes); ``hostfile`` lists the nodes in rank
    order (``host slots=N`` lines) and ``master_addr``/``master_port`` are node 0's, the same everywhere.
    """
    if processes_per_node < 1 or nodes < 1:
        raise LayerMoEError(f"processes per node ({processes_per_node}) and nodes ({nodes}) must be >= 1")
    if nodes > 1 and (hostfile is None or master_port is None):
        raise LayerMoEError("a stage on several nodes needs a hostfile and a master port shared by all nodes")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes_per_node),
               "--master_addr", master_addr, "--master_port", str(master_port or free_port())]
    if nodes > 1:
        command += ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank), "--num_nodes", str(nodes)]
    command += [*stage_entry(stage), "--config", str(config_path)]
    if round_name is not None:
        command += ["--round", round_name]
    if force:
        command.append("--force")
    return command + list(overrides)


def run_stage_in_processes(config_path: str | Path, stage: str, round_name: str | None, overrides: Sequence[str],
                           num_processes: int, force: bool = False) -> None:
    """Run ``stage`` (for one round, or every ready round when ``round_name`` is None) in ``num_processes``
    local processes through the DeepSpeed launcher; its output goes straight to this process's stdout/stderr.

    Raises :class:`StageProcessesFailed` (a ``LayerMoEError``) with the exit code when the stage fails.
    Call it from a single process: the launcher starts the ranks itself.
    """
    command = launch_stage_command(config_path, stage, round_name, overrides, num_processes, force=force)
    where = f"{stage}" + (f" ({round_name})" if round_name else "")
    log.info(f"{where}: {num_processes} processes: {shlex.join(command)}")
    returncode = subprocess.run(command).returncode
    if returncode != 0:
        raise StageProcessesFailed(f"{where} failed in {num_processes} processes with exit code {returncode}",
                                   returncode)


# ----------------------------------------------------------------------------------------------------------
# Command line for slurm/expand.sh
# ----------------------------------------------------------------------------------------------------------


def gpus_on_node() -> int:
    """GPUs this node gives the job: SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES, else what torch sees."""
    if os.environ.get("SLURM_GPUS_ON_NODE"):
        return int(os.environ["SLURM_GPUS_ON_NODE"])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    import torch

    return torch.cuda.device_count()


def gpu_requirement(config: RunConfig) -> str | None:
    """Why ``config`` cannot run without GPUs, or None when it can."""
    if config.launch.require_gpus:
        return "launch.require_gpus is true"
    if config.model.device.startswith("cuda"):
        return f"model.device is {config.model.device!r}"
    ds = deepspeed_config(config.train.ds_config, config.train.stage1, config.train.gradient_clipping)
    ds_precision = precision(ds)
    if ds_precision != "fp32":
        return f"train.ds_config {config.train.ds_config} enables {ds_precision} (on CPU: ds_configs/cpu_fp32.json)"
    return None


def _preflight(args: argparse.Namespace) -> None:
    """Print what the Slurm script needs as KEY=VALUE lines; fail (writing nothing) when the node cannot run it."""
    from pipeline.config import load_config
    from pipeline.runner import STAGES

    config = load_config(args.config, args.overrides)
    gpus = gpus_on_node()
    reason = gpu_requirement(config)
    if reason and gpus == 0:
        raise LayerMoEError(f"this node has no GPUs (SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES) but the config "
                            f"needs them: {reason}; nothing was run")
    processes = int(os.environ.get("LAYERMOE_PROCS_PER_NODE") or gpus or config.launch.processes_per_node)
    print(f"run_dir={config.run_path.resolve()}")
    print(f"rounds={' '.join(r.name for r in config.rounds)}")
    print(f"stages={' '.join(STAGES)}")
    print(f"multi_process_stages={' '.join(MULTI_PROCESS_STAGES)}")
    print(f"gpus_per_node={gpus}")
    print(f"processes_per_node={processes}")


def _stage(args: argparse.Namespace) -> None:
    """Replace this process with the DeepSpeed launcher for this node's share of a stage."""
    command = launch_stage_command(args.config, args.stage, args.round, args.overrides, args.processes_per_node,
                                   nodes=args.nodes, node_rank=args.node_rank, master_addr=args.master_addr,
                                   master_port=args.master_port, hostfile=args.hostfile, force=args.force)
    sys.stdout.flush()
    os.execv(command[0], command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.launch", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preflight", help="check CONFIG against this node; print run_dir, rounds, stages, processes")
    p.add_argument("config")
    p.set_defaults(func=_preflight)
    p = sub.add_parser("stage", help="exec the DeepSpeed launcher for this node's processes of one stage")
    p.add_argument("stage")
    p.add_argument("--config", required=True)
    p.add_argument("--round")
    p.add_argument("--force", action="store_true")
    p.add_argument("--processes-per-node", type=int, default=1)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=int(os.environ.get("SLURM_NODEID", "0")),
                   help="default: $SLURM_NODEID, else 0")
    p.add_argument("--master-addr", default=LOOPBACK)
    p.add_argument("--master-port", type=int)
    p.add_argument("--hostfile")
    p.set_defaults(func=_stage)
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides are KEY=VALUE)")
    args.overrides = overrides
    try:
        args.func(args)
    except LayerMoEError as e:
        log.error(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
