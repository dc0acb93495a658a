"""Loading the dense base model from a local HF directory, and finding each decoder layer's FFN.

Supported: decoders whose layers expose the FFN as ``layer.mlp`` (Llama, Qwen2 / Qwen1.5, Mistral, Gemma3
text). Everything is checked from config.json before any weight is read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pipeline.atomic import read_json
from pipeline.config import ModelConfig
from pipeline.default_model import ensure_default_model
from pipeline.errors import LayerMoEError
from pipeline.hf_modeling.configuration_layermoe import LayerMoEConfig
from pipeline.hf_modeling.modeling_layermoe import LayerMoEForCausalLM

SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def resolve_model_path(model: ModelConfig, cache_dir: Path) -> Path:
    """The HF directory of the configured base model (``default`` builds the built-in one on first use)."""
    if model.path == "default":
        return ensure_default_model(cache_dir)
    return Path(model.path).expanduser()


def read_model_config(path: Path) -> dict:
    """config.json of a model directory, checked for a supported architecture (an expanded LayerMoE model's
    base architecture must be supported too)."""
    path = Path(path)
    if not path.is_dir():
        raise LayerMoEError(f"model directory {str(path)!r} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LayerMoEError(f"model directory {str(path)!r} has no config.json")
    cfg = read_json(cfg_file, "model config")
    model_type = cfg.get("model_type")
    if model_type == "layermoe":
        model_type = cfg.get("base_config", {}).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise LayerMoEError(f"unsupported architecture {model_type!r} (architectures {cfg.get('architectures')}) "
                            f"in {str(path)!r}; supported model types: {supported}")
    return cfg


def load_causal_lm(path: Path, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    """Load a supported dense causal LM, or an expanded LayerMoE model, from a local directory, in eval mode."""
    config = read_model_config(path)
    if not any(any(Path(path).glob(p)) for p in WEIGHT_PATTERNS):
        raise LayerMoEError(f"model directory {str(path)!r} has a config.json but no weights "
                            f"(*.safetensors or pytorch_model*.bin)")
    try:
        if config["model_type"] == "layermoe":  # our own classes: no remote code involved
            model = LayerMoEForCausalLM.from_pretrained(str(path), config=LayerMoEConfig.from_pretrained(str(path)),
                                                        dtype=getattr(torch, dtype), local_files_only=True)
            for parameter in model.parameters():  # from_pretrained leaves the wrapped base model's in the file's dtype
                parameter.data = parameter.data.to(getattr(torch, dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), local_files_only=True)
    except Exception as e:  # corrupt or mismatched checkpoints raise many types (SafetensorError, OSError, ...)
        raise LayerMoEError(f"cannot load model from {str(path)!r}: {type(e).__name__}: {e}") from e
    return model.to(device).eval()


def pick_device(requested: str) -> str:
    """``auto`` -> cuda if available else cpu; anything else is checked and returned."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise LayerMoEError(f"model.device is {requested!r} but no CUDA device is available")
    return requested


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list of a supported dense or expanded causal LM."""
    inner = model.base if isinstance(model, LayerMoEForCausalLM) else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise LayerMoEError(f"{type(model).__name__}: no model.layers; supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    return layers


def ffn_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FFN module (an MoE block in expanded layers) of every decoder layer, in layer order; its input is
    the 'HSA' of docs/method.md, 3.1."""
    layers = decoder_layers(model)
    missing = [i for i, layer in enumerate(layers) if not hasattr(layer, "mlp")]
    if missing:
        raise LayerMoEError(f"decoder layers {missing} of {type(model).__name__} have no 'mlp' FFN module")
    return [layer.mlp for layer in layers]
