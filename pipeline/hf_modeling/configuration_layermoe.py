"""Configuration of a LayerMoE-expanded causal LM.

This file is copied into every saved checkpoint, so it imports nothing from the ``pipeline`` package:
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works with transformers alone.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig


class LayerMoEConfig(PretrainedConfig):
    """A dense base architecture (``base_config``) whose FFNs became mixtures of experts.

    * ``experts_per_layer[i]``: total experts in layer i, expert 0 being the original FFN (1 = dense layer).
    * ``expert_rounds[i][e]``: the expansion round that added expert e of layer i (0 = original).
    * ``num_experts_per_tok``: top-k of the routers (clipped to a layer's expert count).
    * ``classifier_layers``: layers whose old/new classifier can send a token to expert 0 alone.
    * ``classifiers_active``: whether those classifiers act. Upcycling and growth set it False (in stage 1 every
      layer routes top-k over all experts, as in the authors' recipe); training stage 2 sets it True, and so
      does every model it exports. (Checkpoints written before the flag existed load with True.)
    * ``pooling``: what the classifier sees; ``prefix`` (causal running mean of the valid tokens so far) or
      ``sequence`` (the reference: sum over the sequence in the current forward).
    * ``rounds``: ``[{"name", "languages"}]`` of every expansion round; ``original_languages``: the base model's.
    """

    model_type = "layermoe"

    def __init__(self, base_config: dict | None = None, experts_per_layer: list[int] | None = None,
                 expert_rounds: list[list[int]] | None = None, classifier_layers: list[int] | None = None,
                 num_experts_per_tok: int = 2, pooling: str = "prefix", rounds: list[dict] | None = None,
                 original_languages: list[str] | None = None, classifiers_active: bool = True, **kwargs):
        self.base_config = dict(base_config or {})
        self.experts_per_layer = list(experts_per_layer or [])
        self.expert_rounds = [list(r) for r in (expert_rounds or [[0] * n for n in self.experts_per_layer])]
        self.classifier_layers = sorted(classifier_layers or [])
        self.classifiers_active = bool(classifiers_active)
        self.num_experts_per_tok = num_experts_per_tok
        self.pooling = pooling
        self.rounds = list(rounds or [])
        self.original_languages = list(original_languages or [])
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "bos_token_id", "eos_token_id", "pad_token_id"):
            if key in self.base_config:
                kwargs.setdefault(key, self.base_config[key])
        kwargs.setdefault("tie_word_embeddings", False)  # ties live in the base model, not in the wrapper
        super().__init__(**kwargs)

    def base(self) -> PretrainedConfig:
        """The base architecture's config object, without a dtype of its own: the base model is built in the dtype
        the wrapper is loaded in (``from_pretrained(..., dtype=...)``), not in the one the base was saved in."""
        cfg = {k: v for k, v in self.base_config.items() if k not in ("dtype", "torch_dtype")}
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
