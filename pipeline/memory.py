"""Memory of this process: peak and current use (GPU allocations on a GPU, resident set size on CPU), and
keeping freed host memory from piling up in malloc's arenas."""

from __future__ import annotations

import ctypes
import resource
from pathlib import Path

import psutil
import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def process_status_bytes(field: str) -> int | None:
    """A memory figure of this process from Linux's ``/proc/self/status`` in bytes (``VmRSS``: resident now,
    ``VmHWM``: its peak, ``RssFile``: file pages mapped in), or None where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on ``device`` when it is a GPU, else this process's peak resident set size: Linux's
    VmHWM, which is this program's own (``ru_maxrss``, the fallback elsewhere, also counts what the parent held when
    it started this process: 1.5 GiB for a training stage started by a pytest worker of that size)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = process_status_bytes("VmHWM")
    if peak is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return peak / 2**30


def memory_in_use_gib(device: torch.device) -> float:
    """GPU memory allocated on ``device`` now when it is a GPU, else this process's resident set size now."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def return_freed_memory_to_the_os() -> bool:
    """With glibc, serve every allocation of 1 MiB or more by mmap (a fixed ``M_MMAP_THRESHOLD``), so that a freed
    tensor goes back to the operating system at once. By default glibc raises that threshold as large blocks are
    freed (up to 32 MiB), after which activations of that size come from its arenas, which keep the memory: on CPU
    the resident size then grows from training step to step (1.5 GiB more at step 2 of the default model with 4 x
    512-token micro-batches). Returns whether the setting took effect (False without glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
