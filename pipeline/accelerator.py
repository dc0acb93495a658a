"""Which accelerator DeepSpeed uses in this process and in the processes it starts: the CPU when PyTorch sees no
GPU. Kept out of the package's ``__init__`` so that modules without torch (atomic writes, config, errors) import
without it."""

from __future__ import annotations

import os

import torch


def choose_deepspeed_accelerator() -> None:
    """DeepSpeed chooses its accelerator when it is first imported and, finding no GPU, warns before it falls back
    to the CPU: choose the CPU first (child processes inherit it). Call before importing DeepSpeed or starting its
    launcher; a value already set (by the user, slurm/expand.sh) is kept."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
