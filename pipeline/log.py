"""Progress and status output: one prefixed line per event, on stderr, rank 0 only under torch.distributed."""

from __future__ import annotations

import os
import sys
import time


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def info(message: str) -> None:
    """Print a status line (rank 0 only)."""
    if _rank() == 0:
        print(f"[layermoe {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Print a warning line (rank 0 only)."""
    if _rank() == 0:
        print(f"[layermoe {time.strftime('%H:%M:%S')}] WARNING: {message}", file=sys.stderr, flush=True)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def error(message: str) -> None:
    """Print an error line (every rank: errors must never be hidden)."""
    print(f"[layermoe {time.strftime('%H:%M:%S')}] ERROR: {message}", file=sys.stderr, flush=True)
