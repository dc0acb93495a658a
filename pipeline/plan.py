"""``plan``: total and activated parameters of an expanded model, from its config and an allocation,
without loading weights (the dense model is built on the meta device, so every architecture detail counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.base_model import read_model_config
from pipeline.errors import LayerMoEError
from pipeline.log import human_bytes

BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}
TRAINING_BYTES_PER_PARAM = 16  # mixed precision Adam: 2 weight + 2 grad + 4 master + 4 + 4 moments


@dataclass
class ParameterPlan:
    dense_total: int
    expert_params_per_layer: list[int]
    experts_per_layer: list[int]
    classifier_layers: list[int]
    top_k: int
    hidden_size: int

    @property
    def added_experts(self) -> int:
        return sum((e - 1) * p for e, p in zip(self.experts_per_layer, self.expert_params_per_layer))

    @property
    def routers(self) -> int:
        return sum(self.hidden_size * e for e in self.experts_per_layer if e > 1)

    @property
    def classifiers(self) -> int:
        return 2 * self.hidden_size * len(self.classifier_layers)

    @property
    def total(self) -> int:
        return self.dense_total + self.added_experts + self.routers + self.classifiers

    @property
    def activated(self) -> int:
        """Parameters one (new-language) token uses: min(k, E_i) experts per layer, routers, classifiers."""
        extra = sum((min(self.top_k, e) - 1) * p for e, p in zip(self.experts_per_layer, self.expert_params_per_layer))
        return self.dense_total + extra + self.routers + self.classifiers


def dense_parameter_counts(model_config: dict) -> tuple[int, list[int]]:
    """(total parameters, FFN parameters of each layer) of the dense model described by a config.json dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(model_config)
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    ffn = [sum(p.numel() for p in layer.mlp.parameters()) for layer in model.model.layers]
    return total, ffn


def plan(model_config: dict, experts_per_layer: list[int], classifier_layers: list[int], top_k: int = 2) -> ParameterPlan:
    """The parameter plan for a model config.json dict and an allocation."""
    total, ffn = dense_parameter_counts(model_config)
    if len(experts_per_layer) != len(ffn):
        raise LayerMoEError(f"allocation has {len(experts_per_layer)} layers, the model has {len(ffn)}")
    if top_k < 1:
        raise LayerMoEError(f"top-k must be >= 1, got {top_k}")
    return ParameterPlan(total, ffn, list(experts_per_layer), list(classifier_layers), top_k,
                         model_config["hidden_size"])


def load_model_config(path: Path) -> dict:
    """The dense architecture's config.json dict, from a model directory or the file itself (for an expanded
    model: its base architecture)."""
    path = Path(path)
    config = read_model_config(path.parent if path.name == "config.json" else path)
    return config["base_config"] if config["model_type"] == "layermoe" else config


def format_plan(p: ParameterPlan, dtype: str = "bfloat16") -> str:
    """A human-readable summary: totals, activated, memory per expert."""
    b = BYTES_PER_PARAM[dtype]
    sizes = sorted(set(p.expert_params_per_layer))
    lines = [
        f"layers: {len(p.experts_per_layer)}   experts per layer: {p.experts_per_layer}",
        f"new experts: {sum(e - 1 for e in p.experts_per_layer)}   classifier layers: {p.classifier_layers}   top-k: {p.top_k}",
        f"dense model:           {p.dense_total:>16,} parameters ({p.dense_total / 1e9:.3f}B)",
        f"added experts:         {p.added_experts:>16,}",
        f"routers + classifiers: {p.routers + p.classifiers:>16,}",
        f"total:                 {p.total:>16,} parameters ({p.total / 1e9:.3f}B)",
        f"activated per token:   {p.activated:>16,} parameters ({p.activated / 1e9:.3f}B)",
        f"one expert:            {', '.join(f'{s:,}' for s in sizes)} parameters = "
        f"{', '.join(human_bytes(s * b) for s in sizes)} in {dtype}, "
        f"{', '.join(human_bytes(s * TRAINING_BYTES_PER_PARAM) for s in sizes)} when trained with Adam (mixed precision)",
        f"weights in {dtype}:     {human_bytes(p.total * b)}",
    ]
    return "\n".join(lines)
