"""Starting a stage in several processes through the DeepSpeed launcher.

The caller names the stage and gives its entry point (the ``stages/`` script and its fixed arguments, from the
stage table in ``pipeline/stages.py``); this module only builds and runs the launcher's command line. How the
started processes find their ranks is ``pipeline/ranks.py``; the Slurm side is ``pipeline/cluster.py``.

The launcher is kept from acting on stop signals (it would kill the ranks); this process forwards them to the
ranks, which stop at a safe point (``pipeline/stop_signals.py``).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from pipeline import log
from pipeline.accelerator import choose_deepspeed_accelerator
from pipeline.errors import LayerMoEError
from pipeline.ranks import LOOPBACK, free_port
from pipeline.stop_signals import (EXIT_STOPPED, StopRequested, forwarding_stop_signals,
                                   launcher_ignores_stop_signals)


class StageProcessesFailed(LayerMoEError):
    """A stage run in several processes exited with a non-zero status."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def launch_stage_command(entry: Sequence[str], config_path: str | Path, round_name: str | None = None,
                         overrides: Sequence[str] = (), processes_per_node: int = 1, *, nodes: int = 1,
                         node_rank: int = 0, master_addr: str = LOOPBACK, master_port: int | None = None,
                         hostfile: str | Path | None = None, force: bool = False,
                         resume_from: str | Path | None = None) -> list[str]:
    """The DeepSpeed-launcher command that runs a stage's ``entry`` (its script's path and fixed arguments,
    e.g. ``[.../stages/train.py, --stage, 1]``) in ``processes_per_node`` processes on this node.

    On CPU ``--num_gpus`` is the number of processes. For several nodes, run the command once per node with
    its ``node_rank`` (``--no_ssh``: no launcher reaches other nodes); ``hostfile`` lists the nodes in rank
    order (``host slots=N`` lines) and ``master_addr``/``master_port`` are node 0's, the same everywhere.
    """
    if not Path(entry[0]).is_file():
        raise LayerMoEError(f"stage entry point {entry[0]} does not exist")
    if processes_per_node < 1 or nodes < 1:
        raise LayerMoEError(f"processes per node ({processes_per_node}) and nodes ({nodes}) must be >= 1")
    if nodes > 1 and (hostfile is None or master_port is None):
        raise LayerMoEError("a stage on several nodes needs a hostfile and a master port shared by all nodes")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes_per_node),
               "--master_addr", master_addr, "--master_port", str(master_port or free_port())]
    if nodes > 1:
        command += ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank), "--num_nodes", str(nodes)]
    command += [*entry, "--config", str(config_path)]
    if round_name is not None:
        command += ["--round", round_name]
    if force:
        command.append("--force")
    if resume_from is not None:
        command += ["--resume-from", str(resume_from)]
    return command + list(overrides)


def run_stage_in_processes(stage_name: str, entry: Sequence[str], config_path: str | Path, round_name: str | None,
                           overrides: Sequence[str], num_processes: int, force: bool = False,
                           resume_from: str | Path | None = None) -> None:
    """Run a stage (its ``entry``, see :func:`launch_stage_command`; for one round, or every ready round when
    ``round_name`` is None) in ``num_processes`` local processes through the DeepSpeed launcher; its output goes
    straight to this process's stdout/stderr. Stop signals to this process are forwarded to the ranks.

    Raises :class:`StageProcessesFailed` (a ``LayerMoEError``) with the exit code when the stage fails, and
    :class:`~pipeline.stop_signals.StopRequested` when the ranks stopped on a stop signal.
    Call it from a single process: the launcher starts the ranks itself.
    """
    command = launch_stage_command(entry, config_path, round_name, overrides, num_processes, force=force,
                                   resume_from=resume_from)
    where = stage_name + (f" ({round_name})" if round_name else "")
    log.info(f"{where}: {num_processes} processes: {shlex.join(command)}")
    choose_deepspeed_accelerator()  # the launcher imports DeepSpeed; it and the ranks inherit the choice
    process = subprocess.Popen(command, start_new_session=True, preexec_fn=launcher_ignores_stop_signals)
    with forwarding_stop_signals(process) as stop:
        returncode = process.wait()
    if stop.interrupted:
        raise KeyboardInterrupt
    if returncode == EXIT_STOPPED or (stop.signal_name and returncode != 0):
        raise StopRequested(f"{where}: stopped by {stop.describe()} (the processes exited with status {returncode})")
    if returncode != 0:
        raise StageProcessesFailed(f"{where} failed in {num_processes} processes with exit code {returncode}",
                                   returncode)
