"""The dense baselines (``expansion: dense_full | dense_ffn | lora``; docs/method.md, 4): the same data, schedule
and training engine as the MoE expansion, but the dense model itself trains, in both stages, on CE alone.

* ``dense_full``: every parameter of the base model;
* ``dense_ffn``: the FFN (``mlp``) parameters of every decoder layer;
* ``lora``: LoRA adapters (peft) on the linear layers named by ``train.lora.target_modules``, merged into the
  weights when the stage exports its model, so every exported model is a plain dense HF model.
"""

from __future__ import annotations

import torch

from pipeline.base_model import ffn_modules
from pipeline.config import Expansion, LoraSettings
from pipeline.errors import LayerMoEError
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM

DENSE_EXPANSIONS = ("dense_full", "dense_ffn", "lora")


def prepare_dense_model(model: torch.nn.Module, expansion: Expansion,
                        lora: LoraSettings) -> tuple[torch.nn.Module, dict[str, list[str]]]:
    """The model to train (``model`` itself, or wrapped with LoRA adapters) with only the baseline's parameters
    trainable, and the names of those parameters under one role name (the expansion's)."""
    if expansion not in DENSE_EXPANSIONS:
        raise ValueError(f"not a dense expansion: {expansion!r}")
    if isinstance(model, LayerMoEForCausalLM):
        raise LayerMoEError(f"expansion {expansion!r} trains a dense model, but the input is an expanded LayerMoE model")
    if expansion == "lora":
        from peft import LoraConfig, get_peft_model  # only the LoRA baseline needs peft

        targets = lora.target_modules[0] if lora.target_modules == ["all-linear"] else list(lora.target_modules)
        model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    else:
        ffn = {id(p) for module in ffn_modules(model) for p in module.parameters()}
        for p in model.parameters():
            p.requires_grad_(expansion == "dense_full" or id(p) in ffn)
    return model, {expansion: [name for name, p in model.named_parameters() if p.requires_grad]}


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain HF model to export: LoRA adapters merged into the weights (other models as they are)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
