"""Exporting a model as a self-contained HF directory (weights, config, tokenizer; for an expanded model also its
modeling code).

Not to be confused with ``training_checkpoint.py`` (DeepSpeed checkpoints to resume a training stage)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from pipeline.atomic import atomic_directory, cannot_write
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM
from pipeline.token_store import TOKENIZER_FILES as ENCODING_FILES

MODELING_DIR = Path(__file__).parent / "hf_modeling"
MODELING_FILES = ("configuration_layermoe.py", "modeling_layermoe.py", "router_kernel.py")
# every file that decides how the tokenizer encodes text (so a later round finds the token stores of this one), and
# the prompt and generation settings
TOKENIZER_FILES = (*ENCODING_FILES, "chat_template.jinja", "generation_config.json")


def export_model(model: torch.nn.Module, out_dir: Path, tokenizer_from: Path | None = None) -> Path:
    """Write ``model`` to ``out_dir`` atomically: safetensors weights, config.json, the tokenizer files found in
    ``tokenizer_from``; for an expanded model also ``auto_map`` in config.json and the modeling code (so
    ``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`` works without this package). A
    dense model (the dense baselines) is saved as the plain HF model it is. A failed write is an error naming it."""
    expanded = isinstance(model, LayerMoEForCausalLM)
    if expanded:
        model.config.auto_map = {"AutoConfig": "configuration_layermoe.LayerMoEConfig",
                                 "AutoModelForCausalLM": "modeling_layermoe.LayerMoEForCausalLM"}
        model.config.architectures = ["LayerMoEForCausalLM"]
    try:
        with atomic_directory(Path(out_dir)) as tmp:
            model.save_pretrained(tmp)
            for name in MODELING_FILES if expanded else ():
                shutil.copyfile(MODELING_DIR / name, tmp / name)
            if tokenizer_from is not None:
                for name in TOKENIZER_FILES:
                    if (Path(tokenizer_from) / name).is_file() and not (tmp / name).exists():
                        shutil.copyfile(Path(tokenizer_from) / name, tmp / name)
    except (OSError, RuntimeError, SafetensorError) as e:  # e.g. a full disk; nothing of out_dir changed
        raise cannot_write(out_dir, e) from None
    return Path(out_dir)
