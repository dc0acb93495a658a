"""The capacity planner against measurements: the activation formula against the tensors autograd saves, FLOPs
against PyTorch's FLOP counter; the ``layermoe plan CONFIG`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from pipeline.base_model import decoder_layers
from pipeline.capacity import (Expansion, Hardware, ModelShape, compute_estimate, layer_activation_bytes,
                               parse_bytes, training_setup)
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import LayerMoEError
from pipeline.hf_modeling import modeling_layermoe
from pipeline.upcycle import ExpansionRound, set_trainable, upcycle

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


def moe_model(config, experts: int, dtype: torch.dtype = torch.float32):
    """A seeded dense model of ``config`` upcycled to ``experts`` per layer, stage-1 parameters trainable."""
    torch.manual_seed(0)
    model = upcycle(AutoModelForCausalLM.from_config(config), ExpansionRound("g1", ["el"], [experts] * config.num_hidden_layers,
                                                                              []), ["en"], 2)
    set_trainable(model, ["experts_round1", "routers"])
    return model.to(dtype).train()


ARCHITECTURES = {
    "llama": LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2),
    "qwen2": Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=224, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4),
}


@pytest.mark.parametrize("architecture, experts, dtype", [("llama", 3, torch.float32), ("llama", 5, torch.bfloat16),
                                                          ("qwen2", 2, torch.float32)])
def test_layer_activation_formula_matches_the_saved_tensors(architecture, experts, dtype, monkeypatch):
    """Bytes autograd keeps for the backward in a decoder layer (above the lowest, which keeps less), each storage
    once, parameters excluded, against ``layer_activation_bytes``: within 10% (it counts every routed slot's four
    MLP tensors, a frozen expert keeps three). Without the padding of expert batches on CPU in bf16 (``run_expert``;
    here it would be most of the 160 tokens' rows, at the paper's micro-batches a few percent)."""
    monkeypatch.setattr(modeling_layermoe, "CPU_ROW_MULTIPLE", 1)
    config = ARCHITECTURES[architecture]
    model = moe_model(config, experts, dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layer = decoder_layers(model)[1]
    saved: dict[int, int] = {}
    inside = [False]
    layer.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: inside.__setitem__(0, False))

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if inside[0] and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = 4 * 40
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, 300, (4, 40)), use_cache=False, hidden_states_only=True)
    predicted, _ = layer_activation_bytes(ModelShape.from_config(config.to_dict()), tokens, experts, 2,
                                          2 if dtype == torch.bfloat16 else 4)
    assert predicted == pytest.approx(sum(saved.values()), rel=0.10)


def write_run_config(root: Path, run_dir: Path, ds_config: str, block: int = 64, micro: int = 2, ep_size: int = 1,
                     activation_checkpointing: bool = False) -> Path:
    sources = {lang: {"path": str(root / f"{lang}.jsonl")} for lang in ("en", "el", "hu")}
    body = {"name": "cap", "run_dir": str(run_dir), "old_languages": ["en"],
            "rounds": [{"name": "g1", "languages": ["el", "hu"]}], "model": {"path": str(root / "dense")},
            "data": {"builtin_corpus": "none", "sources": sources},
            "allocate": {"method": "uniform", "experts_per_layer": 5, "classifier_count": 0},
            "train": {"ds_config": f"ds_configs/{ds_config}.json", "ep_size": ep_size,
                      "activation_checkpointing": activation_checkpointing,
                      "stage1": {"steps": 2, "warmup_steps": 1, "micro_batch_size": micro, "block_length": block,
                                 "tokens_per_language": 2000},
                      "stage2": {"micro_batch_size": micro, "block_length": block}}}
    path = run_dir.with_suffix(".json")
    path.write_text(json.dumps(body))
    return path


@pytest.mark.parametrize("training_stage, checkpointing", [(1, False), (2, False), (1, True)])
def test_flops_per_token_match_the_flop_counter(tmp_path, training_stage, checkpointing):
    """Matmul and attention FLOPs of one forward + backward (PyTorch's FlopCounterMode) against the estimate:
    within 10% (the estimate assumes uniform routing and full, not causal, attention)."""
    from pipeline.hf_modeling.modeling_layermoe import output_logits
    from pipeline.losses import HiddenStates, next_token_loss
    from pipeline.train import enable_activation_checkpointing

    config = ARCHITECTURES["llama"]
    model = moe_model(config, 4)
    set_trainable(model, ["experts_round1", "routers"] if training_stage == 1 else ["routers", "classifiers"])
    if checkpointing:
        enable_activation_checkpointing(model)
    batch, length = 4, 64
    ids = torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as counter:
        hidden = model(input_ids=ids, use_cache=False, hidden_states_only=True).last_hidden_state
        next_token_loss(HiddenStates(hidden, lambda x: output_logits(model, x), 64), ids).backward()
    expansion = Expansion("g1", 1, [[0, 1, 1, 1]] * 3, [], "test")
    run_config = write_run_config(tmp_path, tmp_path / "model", "zero1_fp32", block=length, micro=batch,
                                  activation_checkpointing=checkpointing)
    setup = training_setup(load_config(run_config), training_stage)
    estimate = compute_estimate(ModelShape.from_config(config.to_dict()), expansion, setup, Hardware(1, 1, 2**40))
    assert estimate.flops_per_token * batch * length == pytest.approx(counter.get_total_flops(), rel=0.10)


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------


def test_plan_command_for_a_paper_config_and_its_suggestions(capsys):
    config = str(ROOT / "configs" / "qwen15_1.8b_g1.yaml")
    model = str(DATA / "qwen1.5-1.8b")
    assert main(["plan", config, "--model", model, "--gpus-per-node", "8", "--nodes", "1", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "round g1" in out and "fits" in out and "stage time" in out and "WARNING" not in out
    assert "assumed (no allocation.json yet)" in out
    # too small a GPU: a warning, and every suggestion fits when applied
    assert main(["plan", config, "--model", model, "--gpu-memory", "16GiB", "train.activation_checkpointing=false"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: round g1 stage 1 needs" in out
    suggestions, stage = [], None
    for line in out.splitlines():
        if line.strip().startswith("WARNING: round g1 stage"):
            stage = line.split("stage ")[1].split()[0]
        elif line.strip().startswith("- "):
            changes = line.rsplit(":", 1)[0].split("together:")[-1]
            suggestions.append((stage, [part.strip(",") for part in changes.split() if "=" in part]))
    assert len(suggestions) >= 3 and all(overrides for _, overrides in suggestions)
    for stage, overrides in suggestions:  # applied to the config, each makes its stage fit
        assert main(["plan", config, "--model", model, "--gpu-memory", "16GiB", *overrides]) == 0
        assert f"round g1 stage {stage} needs" not in capsys.readouterr().out, (stage, overrides)


def test_plan_errors_are_one_clear_line(capsys):
    config = str(ROOT / "configs" / "qwen15_1.8b_g1.yaml")
    assert main(["plan", config]) == 2  # model.path is a placeholder
    assert "does not exist" in capsys.readouterr().err
    assert main(["plan", config, "--model", str(DATA / "qwen1.5-1.8b"), "--gpu-memory", "lots"]) == 2
    assert "cannot read 'lots' as a memory size" in capsys.readouterr().err
    assert main(["plan", config, "--model", str(DATA / "qwen1.5-1.8b"), "--gpus-per-node", "6",
                 "train.ep_size=4"]) == 2
    assert "does not divide the number of GPUs (6)" in capsys.readouterr().err
    with pytest.raises(LayerMoEError):
        parse_bytes("-3GB")
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("40GB") == 40 * 10**9
