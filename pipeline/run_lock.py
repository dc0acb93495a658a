"""One writer per run directory: an exclusive lock on ``<run_dir>/.lock``, held for the life of a command.

The lock is ``flock`` on the file: the kernel releases it when its holder exits, however it exits (SIGKILL
included), so a dead holder never blocks anyone. The holder writes who it is into the file (host, pid, start
time, command) for the message a second run gets. On a shared filesystem this needs working ``flock`` (NFSv4
and Lustre/GPFS with flock enabled).

Only the process that owns the run takes the lock: a plain ``layermoe`` process, or rank 0 of a torchrun /
DeepSpeed / srun launch. The processes the holder starts (the DeepSpeed launcher's ranks, the steps of
``slurm/expand.sh``) inherit ``LAYERMOE_RUN_LOCK=<token>@<lock file>``; a process that finds the lock taken
by the holder with that token shares it instead of failing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from pipeline.errors import LayerMoEError

LOCK_FILE = ".lock"
LOCK_ENV = "LAYERMOE_RUN_LOCK"


class RunDirInUse(LayerMoEError):
    """Another run holds the run directory's lock."""


def _holder(lock_path: Path) -> dict:
    """What the lock file says about its holder ({} when unreadable: a holder that is still writing it)."""
    try:
        doc = json.loads(lock_path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _inherited_token(lock_path: Path) -> str | None:
    """The token of the lock a parent process holds on ``lock_path`` (from ``LAYERMOE_RUN_LOCK``), if any."""
    token, _, path = os.environ.get(LOCK_ENV, "").partition("@")
    return token if token and path and Path(path) == lock_path else None


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block, or share the one a parent process holds; raises
    :class:`RunDirInUse` (naming the holder) when another run has it. ``run_dir`` must exist."""
    lock_path = (Path(run_dir) / LOCK_FILE).resolve()
    f = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            acquired = True
        except BlockingIOError:
            acquired = False
        if not acquired:
            holder = _holder(lock_path)
            if holder.get("token") and holder.get("token") == _inherited_token(lock_path):
                yield  # the process that started this one holds it for us
                return
            who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
                   f"{holder.get('started', '?')}: {holder.get('command', '?')}")
            raise RunDirInUse(f"run directory {run_dir} is in use by another run ({who}); two runs in one directory "
                              f"would overwrite each other's checkpoints: wait for it to finish or stop it")
        token = secrets.token_hex(8)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "command": " ".join(sys.argv)[:300], "token": token}) + "\n")
        f.flush()
        previous = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = f"{token}@{lock_path}"
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(LOCK_ENV, None)
            else:
                os.environ[LOCK_ENV] = previous
    finally:
        f.close()  # releases the lock
