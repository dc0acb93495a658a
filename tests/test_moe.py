"""The expanded MoE model: function preservation, dropless routing, classifier gate, checkpoints, growth."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from pipeline.base_model import load_causal_lm
from pipeline.export import export_model
from pipeline.errors import LayerMoEError
from pipeline.hf_modeling.modeling_layermoe import CPU_ROW_MULTIPLE, LayerMoEBlock, RoutingContext, moe_blocks, run_expert
from pipeline.upcycle import ExpansionRound, grow, parameter_roles, set_trainable, upcycle


def dense_model(model_type: str = "llama", layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, layers=layers)).eval()


def perturb_experts(model, scale: float = 0.05, seed: int = 1) -> None:
    """Make the copies differ from the original so routing matters (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in moe_blocks(model).values():
            for expert in list(block.experts)[1:]:
                for p in expert.parameters():
                    p.add_(scale * torch.randn(p.shape, generator=g))


ROUND1 = ExpansionRound("g1", ["el", "hu"], [2, 3, 1], [1])


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", "mistral"])
@pytest.mark.parametrize("classifiers", [[], [0, 1]])
def test_upcycled_model_computes_the_dense_function(model_type, classifiers):
    dense = dense_model(model_type)
    ids = torch.randint(4, 400, (3, 21))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    with torch.no_grad():
        expected = dense(ids, attention_mask=mask).logits
    model = upcycle(dense, ExpansionRound("g1", ["el"], [2, 3, 1], classifiers), ["en"])
    assert [type(layer.mlp).__name__ for layer in model.base.model.layers] == ["LayerMoEBlock", "LayerMoEBlock", type(dense.model.layers[2].mlp).__name__]
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_upcycled_model_with_distinct_experts_equals_a_per_token_reference(model_type):
    """As after training: new experts differ from the original, classifiers decide both ways. The whole model's
    logits equal those of the same model whose MoE blocks are replaced by the per-token reference (softmax,
    ``torch.topk``, renormalise; the classifier on the prefix mean of the valid tokens)."""
    model = upcycle(dense_model(model_type), ExpansionRound("g1", ["el"], [4, 3, 1], [1]), ["en"])
    model.set_classifiers_active(True)  # as training stage 2 leaves it
    perturb_experts(model, 0.3)
    for block in moe_blocks(model).values():
        if block.classifier is not None:
            perturb_experts_of(block)
    ids = torch.randint(4, 400, (3, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        sent = moe_blocks(model)[1].last_routing.sent_to_original
        assert sent[mask.reshape(-1).bool()].any() and not sent[mask.reshape(-1).bool()].all()
        for block in moe_blocks(model).values():
            block.forward = lambda hidden, block=block: naive_block(block, hidden, mask.bool())
        expected = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


def test_expert_zero_is_the_original_ffn_and_copies_are_exact():
    dense = dense_model()
    original = dense.model.layers[1].mlp.gate_proj.weight
    model = upcycle(dense, ROUND1, ["en"])
    experts = model.base.model.layers[1].mlp.experts
    assert experts[0].gate_proj.weight.data_ptr() == original.data_ptr()  # not a copy
    for e in (1, 2):
        assert torch.equal(experts[e].gate_proj.weight, original)
        assert experts[e].gate_proj.weight.data_ptr() != original.data_ptr()


def naive_block(block: LayerMoEBlock, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-token reference: softmax, top-k, renormalise; the classifier on the prefix mean of valid tokens."""
    batch, seq, _ = x.shape
    out = torch.zeros_like(x)
    for b in range(batch):
        for t in range(seq):
            xt = x[b, t]
            if block.classifier is not None:
                keep = valid[b, : t + 1].float().unsqueeze(-1)
                pooled = (x[b, : t + 1] * keep).sum(0) / keep.sum().clamp(min=1)
                if block.pooling == "sequence":
                    pooled = (x[b] * valid[b].float().unsqueeze(-1)).sum(0)
                if torch.argmax(block.classifier.weight @ pooled) == 0:
                    out[b, t] = block.experts[0](xt[None])[0]
                    continue
            probs = torch.softmax(block.router.weight @ xt, dim=-1)
            w, idx = torch.topk(probs, block.top_k)
            w = w / w.sum()
            out[b, t] = sum(w[j] * block.experts[int(idx[j])](xt[None])[0] for j in range(block.top_k))
    return out


@pytest.mark.parametrize("experts, top_k", [(2, 2), (3, 2), (5, 2), (5, 1), (4, 3)])
@pytest.mark.parametrize("classifier", [False, True])
@pytest.mark.parametrize("pooling", ["prefix", "sequence"])
def test_dropless_routing_matches_per_token_reference(experts, top_k, classifier, pooling):
    dense = dense_model(layers=1)
    torch.manual_seed(experts * 10 + top_k)
    context = RoutingContext()
    block = LayerMoEBlock(dense.model.layers[0].mlp, experts, 32, top_k, classifier, pooling, context).eval()
    perturb_experts_of(block)
    x = torch.randn(3, 11, 32)
    valid = torch.ones(3, 11, dtype=torch.bool)
    valid[1, 7:] = False
    context.attention_mask = valid.long()
    with torch.no_grad():
        got = block(x)
        expected = naive_block(block, x, valid)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    record = block.last_routing
    assert record.expert_indices.shape == (33, min(top_k, experts))
    if classifier:
        assert record.classifier_logits.shape == (33, 2) and record.sent_to_original.dtype == torch.bool


def perturb_experts_of(block: LayerMoEBlock) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for expert in list(block.experts)[1:]:
            for p in expert.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        if block.classifier is not None:  # make both decisions occur
            block.classifier.weight.copy_(torch.randn(block.classifier.weight.shape, generator=g))


@pytest.mark.parametrize("rows", [1, 77, CPU_ROW_MULTIPLE, CPU_ROW_MULTIPLE + 3])
def test_padded_expert_batches_give_the_unpadded_outputs_and_gradients(rows):
    """On CPU in bf16 ``run_expert`` pads an expert's rows with zeros to a multiple of ``CPU_ROW_MULTIPLE``: the
    outputs, the input gradients and the expert's weight gradients equal those of the plain call on random
    inputs (bf16 rounding: a different kernel may run for the padded row count)."""
    torch.manual_seed(rows)
    expert = AutoModelForCausalLM.from_config(tiny_config("llama")).model.layers[0].mlp.to(torch.bfloat16)
    results = []
    for call in (run_expert, lambda module, x: module(x)):
        x = torch.randn(rows, expert.gate_proj.in_features, generator=torch.Generator().manual_seed(rows))
        x = x.to(torch.bfloat16).requires_grad_()  # the same input for both calls
        expert.zero_grad()
        out = call(expert, x)
        assert out.shape == (rows, expert.down_proj.out_features)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad.clone() for p in expert.parameters()])
    for padded, plain in zip(*results):
        torch.testing.assert_close(padded.float(), plain.float(), rtol=2e-2, atol=2e-2)


def test_every_routed_expert_runs_only_on_its_tokens():
    dense = dense_model(layers=1)
    block = LayerMoEBlock(dense.model.layers[0].mlp, 4, 32, 2).eval()
    seen = {e: 0 for e in range(4)}
    for e, expert in enumerate(block.experts):
        expert.register_forward_hook(lambda m, a, o, e=e: seen.__setitem__(e, seen[e] + a[0].shape[0]))
    with torch.no_grad():
        block(torch.randn(2, 13, 32))
    counts = torch.bincount(block.last_routing.expert_indices.reshape(-1), minlength=4)
    assert [seen[e] for e in range(4)] == counts.tolist() and sum(seen.values()) == 2 * 13 * 2


def test_stage1_classifier_layers_route_exactly_the_router_top_k():
    """Upcycled (stage-1) model: the classifiers do not act, so a classifier layer's experts receive exactly the
    tokens of the router's top-k over all experts; once activated (stage 2) the classifier changes that."""
    model = upcycle(dense_model(), ExpansionRound("g1", ["el"], [2, 4, 1], [1]), ["en"])
    assert model.config.classifiers_active is False
    block = moe_blocks(model)[1]
    perturb_experts_of(block)  # a random classifier that would send some tokens to expert 0 if it acted
    received: dict[int, list[torch.Tensor]] = {e: [] for e in range(4)}
    inputs = []
    block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    for e, expert in enumerate(block.experts):
        expert.register_forward_hook(lambda m, a, o, e=e: received[e].append(a[0].detach().clone()))
    ids = torch.randint(4, 400, (3, 17))

    def routed_rows():
        inputs.clear()
        for rows in received.values():
            rows.clear()
        with torch.no_grad():
            model(ids)
        x = inputs[0]
        logits = x.float() @ block.router.weight.float().T
        top = torch.topk(torch.softmax(logits, -1), 2, dim=-1).indices
        got = {e: torch.cat(received[e]) for e in received}
        want = {e: x[(top == e).any(-1)] for e in received}
        return got, want

    got, want = routed_rows()
    assert block.last_routing.classifier_logits is None and block.last_routing.sent_to_original is None
    for e in range(4):
        assert got[e].shape == want[e].shape and torch.equal(got[e], want[e]), e
    assert all(len(got[e]) > 0 for e in range(1, 4))  # the new experts are trained on their tokens
    model.set_classifiers_active(True)
    got, want = routed_rows()
    sent = block.last_routing.sent_to_original
    assert sent.any() and any(got[e].shape != want[e].shape for e in range(1, 4))


def test_prefix_pooling_is_causal():
    dense = dense_model(layers=1)
    block = LayerMoEBlock(dense.model.layers[0].mlp, 3, 32, 2, classifier=True, pooling="prefix").eval()
    perturb_experts_of(block)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        out_a = block(x)
        dec_a = block.last_routing.sent_to_original.clone()
        x2 = x.clone()
        x2[0, 9:] = torch.randn(7, 32, generator=g) * 5
        out_b = block(x2)
        dec_b = block.last_routing.sent_to_original
    # both decisions occur in the compared prefix, and the changed suffix changes later decisions
    assert dec_a[:9].any() and (~dec_a[:9]).any()
    assert not torch.equal(dec_a[9:], dec_b[9:])
    assert torch.equal(dec_a[:9], dec_b[:9])
    torch.testing.assert_close(out_a[0, :9], out_b[0, :9], atol=1e-6, rtol=1e-6)  # GEMM grouping differs


def test_cache_and_no_cache_greedy_generation_agree():
    model = upcycle(dense_model(), ExpansionRound("g1", ["el"], [3, 2, 2], [0, 2]), ["en"])
    model.set_classifiers_active(True)
    perturb_experts(model, 0.3)
    for block in moe_blocks(model).values():
        if block.classifier is not None:
            perturb_experts_of(block)
    prompt = torch.randint(4, 400, (1, 9))
    with_cache = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    without = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert with_cache.tolist() == without.tolist()


def test_save_and_load_through_both_loaders(tmp_path):
    model = upcycle(dense_model("qwen2"), ExpansionRound("g1", ["el"], [2, 3, 2], [1]), ["en"])
    perturb_experts(model)
    model.set_classifiers_active(True)  # as after stage 2: the loaded models must gate the same way
    perturb_experts_of(moe_blocks(model)[1])
    out = export_model(model, tmp_path / "expanded")
    config = json.loads((out / "config.json").read_text())
    assert config["classifiers_active"] is True
    assert config["model_type"] == "layermoe" and config["base_config"]["model_type"] == "qwen2"
    assert config["experts_per_layer"] == [2, 3, 2] and config["classifier_layers"] == [1]
    assert config["num_experts_per_tok"] == 2 and config["pooling"] == "prefix"
    assert config["rounds"] == [{"name": "g1", "languages": ["el"]}] and config["original_languages"] == ["en"]
    base = config["base_config"]  # transformers 4 reads the rotary base here, 5 in rope_parameters
    assert base["rope_theta"] == base["rope_parameters"]["rope_theta"]
    ids = torch.randint(4, 400, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
        gate = moe_blocks(model)[1].last_routing.sent_to_original
        ours = load_causal_lm(out)(ids).logits
    assert gate.any() and not gate.all()  # the classifier decides both ways, so acting or not matters
    assert torch.equal(ours, expected)
    # plain transformers in a fresh interpreter that never imports this package
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "assert not any(name == 'pipeline' or name.startswith('pipeline.') for name in sys.modules), 'pipeline imported'\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"with torch.no_grad(): torch.save(m(ids).logits, {str(tmp_path / 'remote.pt')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "remote.pt"), expected)


def test_loading_in_bfloat16_converts_every_tensor_and_keeps_tied_embeddings(tmp_path):
    """The base model is built in the dtype the wrapper is loaded in (not the one saved in base_config), and an
    lm_head tied to the embeddings (saved once) is no missing tensor."""
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = upcycle(AutoModelForCausalLM.from_config(config).eval(), ROUND1, ["en"])
    perturb_experts(model)
    out = export_model(model, tmp_path / "m")
    loaded = load_causal_lm(out, "bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.base.lm_head.weight is loaded.base.model.embed_tokens.weight
    ids = torch.randint(4, 400, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.to(torch.bfloat16)(ids).logits, atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize("experts", [[2, 2, 1], [2, 4, 1], [2, 3, 2]])
def test_checkpoint_that_disagrees_with_its_config_is_an_error(tmp_path, experts):
    out = export_model(upcycle(dense_model(), ROUND1, ["en"]), tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["experts_per_layer"] = experts
    config["expert_rounds"] = [[0] * n for n in experts]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayerMoEError, match="does not match its config"):
        load_causal_lm(out)
    with pytest.raises(ValueError, match="does not match its config"):
        AutoModelForCausalLM.from_pretrained(out)  # the registered class (same code as the checkpoint's copy)


def test_roles_partition_parameters_and_freeze_exactly():
    model = grow(upcycle(dense_model(), ROUND1, ["en"]), ExpansionRound("g2", ["hi"], [2, 2, 3], [2]))
    roles = parameter_roles(model)
    assert set(roles) == {"original", "routers", "classifiers", "experts_round1", "experts_round2"}
    names = [n for params in roles.values() for n, _ in params]
    assert len(names) == len(set(names)) == len(list(model.named_parameters()))
    assert all(".experts.0." in n or ".experts." not in n for n, _ in roles["original"])
    trainable = set(set_trainable(model, ["experts_round2", "routers"]))
    for name, param in model.named_parameters():
        assert param.requires_grad == (name in trainable)
    assert trainable == {n for r in ("experts_round2", "routers") for n, _ in roles[r]}
    with pytest.raises(LayerMoEError, match="unknown parameter roles"):
        set_trainable(model, ["experts_round9"])


def test_growth_appends_copies_of_the_original_and_preserves_round1_when_new_experts_get_no_weight():
    round1 = upcycle(dense_model(), ROUND1, ["en"])
    perturb_experts(round1, 0.2)
    before = {k: v.clone() for k, v in round1.state_dict().items()}
    round1.set_classifiers_active(True)  # as round 1's stage 2 left it
    round2 = grow(round1, ExpansionRound("g2", ["hi"], [2, 2, 3], [1]), keep_router_rows=True)
    # round 2's stage 1 routes without classifiers, so its experts in classifier layers get tokens
    assert round2.config.classifiers_active is False and round1.config.classifiers_active is True
    round1.set_classifiers_active(False)  # below: both models route the same way
    assert round2.config.experts_per_layer == [3, 4, 3]
    assert round2.config.expert_rounds == [[0, 1, 2], [0, 1, 1, 2], [0, 2, 2]]
    assert round2.config.classifier_layers == [1] and [r["name"] for r in round2.config.rounds] == ["g1", "g2"]
    assert all(torch.equal(before[k], v) for k, v in round1.state_dict().items())  # round 1 untouched
    layers, old_layers = round2.base.model.layers, round1.base.model.layers
    assert torch.equal(layers[1].mlp.experts[3].up_proj.weight, layers[1].mlp.experts[0].up_proj.weight)
    assert torch.equal(layers[1].mlp.experts[1].up_proj.weight, old_layers[1].mlp.experts[1].up_proj.weight)
    assert torch.equal(layers[1].mlp.router.weight[:3], old_layers[1].mlp.router.weight)  # kept rows
    assert torch.equal(layers[1].mlp.classifier.weight, old_layers[1].mlp.classifier.weight)
    # give the new experts no weight: their router logits are -inf
    for i, block in moe_blocks(round2).items():
        old = round1.config.experts_per_layer[i]
        plain = block.router_logits
        block.router_logits = lambda x, plain=plain, old=old: torch.cat(
            [plain(x)[:, :old], torch.full_like(plain(x)[:, old:], float("-inf"))], dim=-1)
    ids = torch.randint(4, 400, (2, 12))
    with torch.no_grad():
        expected = round1(ids).logits
        got = round2(ids).logits
    assert (got - expected).abs().max() <= 1e-5


def test_growth_reinitialises_routers_by_default():
    round1 = upcycle(dense_model(), ROUND1, ["en"])
    round2 = grow(round1, ExpansionRound("g2", ["hi"], [2, 2, 2], []), seed=5)
    old_rows = round1.base.model.layers[0].mlp.router.weight
    assert not torch.equal(round2.base.model.layers[0].mlp.router.weight[:2], old_rows)
    assert round2.config.classifier_layers == []


@pytest.mark.parametrize("plan, message", [
    (ExpansionRound("g1", ["el"], [2, 2], []), "allocation has 2 layers but the model has 3"),
    (ExpansionRound("g1", ["el"], [2, 0, 2], []), ">= 1 expert"),
    (ExpansionRound("g1", ["el"], [2, 2, 2], [3]), "outside layers"),
])
def test_bad_plans(plan, message):
    with pytest.raises(LayerMoEError, match=message):
        upcycle(dense_model(), plan, ["en"])
    with pytest.raises(LayerMoEError, match=message):
        grow(upcycle(dense_model(), ROUND1, ["en"]), plan)


def test_upcycling_an_expanded_model_is_refused():
    with pytest.raises(LayerMoEError, match="already expanded"):
        upcycle(upcycle(dense_model(), ROUND1, ["en"]), ROUND1, ["en"])
