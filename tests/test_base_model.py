"""Loading supported architectures from local directories; clear errors for everything else."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model, tiny_model
from pipeline.base_model import ffn_modules, load_causal_lm, read_model_config
from pipeline.errors import LayerMoEError


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral", "gemma3_text"])
def test_supported_architectures_load(tmp_path, model_type):
    path = make_tiny_model(tmp_path / model_type, model_type, seed=4, layers=2)
    model = load_causal_lm(path)
    assert len(ffn_modules(model)) == 2
    assert not model.training
    saved = tiny_model(model_type, seed=4, layers=2).eval()  # the model make_tiny_model saved
    ids = torch.randint(4, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, saved(ids).logits)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(LayerMoEError, match=r"unsupported architecture 'gpt2'.*llama.*qwen2.*mistral.*gemma3_text"):
        load_causal_lm(tmp_path)


def test_missing_model_pieces(tmp_path):
    with pytest.raises(LayerMoEError, match="does not exist"):
        read_model_config(tmp_path / "nope")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(LayerMoEError, match="has no config.json"):
        read_model_config(tmp_path / "noconfig")
    path = make_tiny_model(tmp_path / "noweights", "llama", layers=1)
    (path / "model.safetensors").unlink()
    with pytest.raises(LayerMoEError, match="no weights"):
        load_causal_lm(path)


def test_corrupt_weights(tmp_path):
    path = make_tiny_model(tmp_path / "corrupt", "llama", layers=1)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LayerMoEError, match="cannot load model"):
        load_causal_lm(path)
    (path / "config.json").write_text("{broken")
    with pytest.raises(LayerMoEError, match="not valid JSON"):
        read_model_config(path)
