"""The command line ``slurm/expand.sh`` runs on the cluster: ``python -m pipeline.cluster preflight|stage``.

* ``preflight CONFIG [KEY=VALUE...]`` checks the config against this node (a config that needs GPUs on a node
  without any fails before anything is written), makes the run directory (refusing a directory this project
  did not make: ``pipeline/run_dir.py``) and prints what the script needs as ``KEY=VALUE`` lines: the run
  directory, the rounds, the stages and which of them split over ranks (from the stage table), GPUs and
  processes per node.
* ``stage STAGE --config C ...`` replaces itself with the DeepSpeed launcher for this node's processes of one
  stage (``pipeline/launch.py``), which ignores SIGTERM and SIGUSR1 so that they reach the ranks
  (``pipeline/stop_signals.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import torch

from pipeline import log
from pipeline.config import RunConfig, load_config
from pipeline.ds_config import deepspeed_config, precision
from pipeline.errors import LayerMoEError
from pipeline.launch import launch_stage_command
from pipeline.ranks import LOOPBACK
from pipeline.run_dir import mark_run_dir
from pipeline.stages import STAGES, finished_stages, get_stage
from pipeline.stop_signals import launcher_ignores_stop_signals


def gpus_on_node() -> int:
    """GPUs this node gives the job: SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES, else what torch sees."""
    if os.environ.get("SLURM_GPUS_ON_NODE"):
        return int(os.environ["SLURM_GPUS_ON_NODE"])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
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
    """Print what the Slurm script needs as KEY=VALUE lines (``finished``: the stages done from the start of the
    run, which it does not launch); fail (writing nothing) when the node cannot run it."""
    config = load_config(args.config, args.overrides)
    gpus = gpus_on_node()
    reason = gpu_requirement(config)
    if reason and gpus == 0:
        raise LayerMoEError(f"this node has no GPUs (SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES) but the config "
                            f"needs them: {reason}; nothing was run")
    processes = int(os.environ.get("LAYERMOE_PROCS_PER_NODE") or gpus or config.launch.processes_per_node)
    mark_run_dir(config)
    print(f"run_dir={config.run_path.resolve()}")
    print(f"rounds={' '.join(r.name for r in config.rounds)}")
    print(f"stages={' '.join(stage.name for stage in STAGES)}")
    print(f"multi_process_stages={' '.join(stage.name for stage in STAGES if stage.splits_over_ranks)}")
    print(f"finished={' '.join(f'{round_name}/{stage}' for round_name, stage in finished_stages(config))}")
    print(f"gpus_per_node={gpus}")
    print(f"processes_per_node={processes}")


def _stage(args: argparse.Namespace) -> None:
    """Replace this process with the DeepSpeed launcher for this node's share of a stage."""
    command = launch_stage_command(get_stage(args.stage).entry_argv, args.config, args.round, args.overrides,
                                   args.processes_per_node, nodes=args.nodes, node_rank=args.node_rank,
                                   master_addr=args.master_addr, master_port=args.master_port, hostfile=args.hostfile,
                                   force=args.force)
    sys.stdout.flush()
    launcher_ignores_stop_signals()
    os.execv(command[0], command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster", description=__doc__.split("\n")[0])
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
