"""LayerMoE: layer-wise mixture-of-experts multilingual expansion of dense causal LLMs."""

__version__ = "0.1.0"
