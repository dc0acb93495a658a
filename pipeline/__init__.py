"""LayerMoE: layer-wise mixture-of-experts multilingual expansion of dense causal LLMs."""

import os

import torch

__version__ = "0.1.0"

# DeepSpeed chooses its accelerator when it is first imported and, finding no GPU, warns before it falls back to
# the CPU. Choose the CPU here, before any module of this package imports DeepSpeed (child processes inherit it).
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
