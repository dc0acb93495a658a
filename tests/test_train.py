"""Training stages on tiny random models: losses and routing statistics by hand, the lr schedule, what is trained,
routing behaviour, resume (also mid-run, in another layout, with dropout), multi-process (2 and 4 ranks), Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import clean_env, run_child, run_cli, synthetic_documents, write_jsonl
from pipeline.base_model import load_causal_lm
from pipeline.config import StageTrainConfig, TrainConfig, installed
from pipeline.hf_modeling.modeling_layermoe import RoutingRecord
from pipeline.ranks import free_port
from pipeline.losses import (HiddenStates, classifier_loss, load_balance, lpr, next_token_loss, next_token_loss_sum,
                             reduce_layers, stage_loss)
from pipeline.routing_stats import LayerRouting, RoutingStats
from pipeline.train import lr_multiplier, trainable_roles
from pipeline.upcycle import parameter_roles

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# loss formulas against hand-computed values
# ---------------------------------------------------------------------------------------------------------

def record(logits, indices, valid=None, classifier_logits=None, sent=None) -> RoutingRecord:
    logits = torch.tensor(logits, dtype=torch.float32)
    n = logits.shape[0]
    probs = torch.softmax(logits, -1)
    indices = torch.tensor(indices)
    weights = probs.gather(1, indices)
    return RoutingRecord(logits, indices, weights / weights.sum(-1, keepdim=True),
                         torch.ones(n, dtype=torch.bool) if valid is None else torch.tensor(valid),
                         None if classifier_logits is None else torch.tensor(classifier_logits, dtype=torch.float32),
                         None if sent is None else torch.tensor(sent))


def test_load_balance_forms_by_hand():
    logits = [[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]]
    r = record(logits, [[0, 1], [0, 2]])
    # by hand, per slot: f[j][e] = share of the 2 tokens whose j-th choice is e; P_e = mean router probability
    probs = [[1 / 3, 1 / 3, 1 / 3], [1 / 2, 1 / 4, 1 / 4]]
    p = [(probs[0][e] + probs[1][e]) / 2 for e in range(3)]
    f = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]
    reference = 3 * sum(f[j][e] * p[e] for j in range(2) for e in range(3))
    assert load_balance(r, "reference").item() == pytest.approx(reference, rel=1e-6)
    assert load_balance(r, "normalized").item() == pytest.approx(reference / 2, rel=1e-6)  # divided by k
    # uniform routing: k (reference) or 1 (normalized), whatever E is
    for e, k in ((2, 2), (3, 2), (5, 2), (5, 3), (4, 1)):
        idx = [[(i + j) % e for j in range(k)] for i in range(e)]
        uniform = record(torch.zeros(e, e).tolist(), idx)
        assert load_balance(uniform, "reference").item() == pytest.approx(k, rel=1e-6)
        assert load_balance(uniform, "normalized").item() == pytest.approx(1.0, rel=1e-6)
    # padding and classifier-gated tokens do not count
    gated = record([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]], [[0, 1], [0, 2]], valid=[True, True], sent=[False, True],
                   classifier_logits=[[0.0, 1.0], [1.0, 0.0]])
    only_first = record([[0.0, 0.0, 0.0]], [[0, 1]])
    assert load_balance(gated).item() == pytest.approx(load_balance(only_first).item())


def test_lpr_forms_by_hand():
    r = record([[math.log(3), 0.0], [0.0, 0.0], [2.0, 1.0]], [[0, 1]] * 3)
    original = torch.tensor([True, False, True])
    p0 = [3 / 4, 1 / (1 + math.exp(-1))]
    assert lpr(r, original, "paper").item() == pytest.approx(-(math.log(p0[0]) + math.log(p0[1])) / 2, rel=1e-6)
    double = [-math.log(math.exp(p) / (math.exp(p) + math.exp(1 - p))) for p in p0]
    assert lpr(r, original, "double_softmax").item() == pytest.approx(sum(double) / 2, rel=1e-6)
    assert lpr(r, torch.tensor([False] * 3)).item() == 0.0


def test_lpr_reductions_by_hand():
    """Three MoE layers, E = 2, 2, 4: ``layers`` averages the three; ``expert_groups`` averages the two E=2 layers,
    then that with the E=4 layer (the authors' LayerMoE code, as reported)."""
    torch.manual_seed(0)
    records = {i: record(torch.randn(4, e).tolist(), [[0, 1]] * 4) for i, e in ((0, 2), (3, 2), (5, 4))}
    original = torch.tensor([[True, False], [True, True]])
    flat = original.reshape(-1)
    per_layer = {i: float(-torch.log_softmax(r.router_logits[flat], -1)[:, 0].mean()) for i, r in records.items()}
    logits, ids = torch.randn(2, 2, 7), torch.randint(0, 7, (2, 2))
    by_layers = stage_loss(2, logits, ids, records, original, TrainConfig(lpr_reduction="layers"))
    by_groups = stage_loss(2, logits, ids, records, original, TrainConfig(lpr_reduction="expert_groups"))
    assert by_layers.lpr.item() == pytest.approx(sum(per_layer.values()) / 3, rel=1e-6)
    assert by_groups.lpr.item() == pytest.approx(((per_layer[0] + per_layer[3]) / 2 + per_layer[5]) / 2, rel=1e-6)
    # equal expert counts everywhere: the two reductions agree
    same = {i: record(r.router_logits.tolist(), [[0, 1]] * 4) for i, r in records.items() if i != 5}
    assert (reduce_layers({i: torch.tensor(per_layer[i]) for i in same}, {0: 2, 3: 2}, "expert_groups").item()
            == pytest.approx((per_layer[0] + per_layer[3]) / 2))


def test_classifier_labels_by_hand():
    # 2 sequences x 3 tokens; the second starts with padding; languages change inside both
    original = torch.tensor([[True, True, False], [False, True, False]])
    valid = [True, True, True, False, True, True]
    cls = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, -5.0], [0.0, 3.0], [1.0, 0.0]]
    r = record([[0.0, 0.0]] * 6, [[0, 1]] * 6, valid=valid, classifier_logits=cls, sent=[False] * 6)
    ce = lambda logits, label: -math.log(math.exp(logits[label]) / sum(math.exp(v) for v in logits))
    OLD_, NEW_ = 0, 1
    # token: every valid token with its own label, mean over the 5 valid tokens
    token_labels = [OLD_, OLD_, NEW_, None, OLD_, NEW_]
    expected_token = sum(ce(cls[t], token_labels[t]) for t in range(6) if valid[t]) / 5
    assert classifier_loss(r, original, "token").item() == pytest.approx(expected_token, rel=1e-6)
    # sequence: sequence 0 is labelled OLD (its first token), sequence 1 OLD (its first VALID token, position 1);
    # mean over each sequence's valid tokens, then over the 2 sequences
    seq0 = (ce(cls[0], OLD_) + ce(cls[1], OLD_) + ce(cls[2], OLD_)) / 3
    seq1 = (ce(cls[4], OLD_) + ce(cls[5], OLD_)) / 2
    assert classifier_loss(r, original, "sequence").item() == pytest.approx((seq0 + seq1) / 2, rel=1e-6)
    # with the reference's pooling every position of a sequence has the same logits: one CE per sequence
    same = [cls[0]] * 3 + [cls[4]] * 3
    r = record([[0.0, 0.0]] * 6, [[0, 1]] * 6, valid=valid, classifier_logits=same, sent=[False] * 6)
    assert classifier_loss(r, original, "sequence").item() == pytest.approx((ce(cls[0], OLD_) + ce(cls[4], OLD_)) / 2,
                                                                            rel=1e-6)


def test_ce_by_hand():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3)  # p(target=2) = 3/6
    ids = torch.tensor([[1, 2, 3]])
    assert next_token_loss(logits, ids).item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)


def test_stage_loss_combines_terms():
    r = record([[1.0, 0.0, 0.5]] * 4, [[0, 2]] * 4, classifier_logits=[[0.3, 0.1]] * 4, sent=[True] * 4)
    logits, ids = torch.randn(1, 4, 7), torch.randint(0, 7, (1, 4))
    original = torch.tensor([[True, False, True, True]])
    s1 = stage_loss(1, logits, ids, {0: r}, original, TrainConfig(alpha=0.5))
    assert s1.total.item() == pytest.approx(s1.ce.item() + 0.5 * s1.balance.item())
    s2 = stage_loss(2, logits, ids, {0: r}, original, TrainConfig(gamma=0.2, beta=0.3))
    assert s2.total.item() == pytest.approx(s2.ce.item() + 0.2 * s2.lpr.item() + 0.3 * s2.classifier.item())
    dense = stage_loss(2, logits, ids, {}, original, TrainConfig())  # a dense baseline: CE only
    assert dense.total.item() == dense.ce.item() and dense.lpr is None and dense.balance is None


def routed_records(mask: torch.Tensor) -> dict[int, RoutingRecord]:
    """The routing records of a real forward through two MoE blocks sharing a routing context: layer 0 with 4
    experts and a classifier that decides both ways (the "new" tokens are routed), layer 1 with 3 experts."""
    from test_moe import dense_model, perturb_experts_of

    from pipeline.hf_modeling.modeling_layermoe import LayerMoEBlock, RoutingContext

    dense = dense_model(layers=2)
    context = RoutingContext()
    blocks = {0: LayerMoEBlock(dense.model.layers[0].mlp, 4, 32, 2, classifier=True, context=context),
              1: LayerMoEBlock(dense.model.layers[1].mlp, 3, 32, 2, context=context)}
    perturb_experts_of(blocks[0])
    context.attention_mask = mask
    hidden = torch.randn(*mask.shape, 32, generator=torch.Generator().manual_seed(5))
    for block in blocks.values():
        hidden = block(hidden)
    return {i: block.last_routing for i, block in blocks.items()}


def loss_inputs():
    """(logits, input ids, original-language mask, padding mask, routing records) of 3 sequences of 9 tokens: the
    first is an original-language sequence with 3 padding positions, the second new, the third original."""
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(3, 9, 11, generator=g), torch.randint(0, 11, (3, 9), generator=g)
    original = torch.tensor([True, False, True]).unsqueeze(1).expand(3, 9)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0
    return logits, ids, original, mask, routed_records(mask)


def by_hand_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position: -log softmax(logits[t])[ids[t + 1]]."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).mean()


def by_hand_gated(r: RoutingRecord) -> torch.Tensor:
    """Tokens the classifier sends to expert 0 (class OLD = 0 wins), from its logits."""
    if r.classifier_logits is None:
        return torch.zeros(len(r.router_logits), dtype=torch.bool)
    return r.classifier_logits[:, 0] > r.classifier_logits[:, 1]


def by_hand_balance(records: dict[int, RoutingRecord], valid: torch.Tensor, k: int = 2,
                    form: str = "reference") -> torch.Tensor:
    """Mean over layers of E * sum_e f_e P_e over the routed tokens (valid, not sent to expert 0): f_e = number of
    top-k slots that chose e per routed token (``reference``: summed over the k slots) or per slot
    (``normalized``), P_e = mean router probability of e."""
    balances = []
    for r in records.values():
        probs = torch.softmax(r.router_logits, dim=-1)
        routed = valid & ~by_hand_gated(r)
        if not routed.any():  # every token sent to expert 0: nothing to balance
            balances.append(torch.zeros(()))
            continue
        top = probs[routed].topk(k, dim=-1).indices
        share = torch.stack([(top == e).sum() for e in range(probs.shape[1])]).float() / len(top)
        if form == "normalized":
            share = share / k
        balances.append(probs.shape[1] * (share * probs[routed].mean(0)).sum())
    return sum(balances) / len(balances)


def by_hand_lpr(records: dict[int, RoutingRecord], on_original: torch.Tensor, form: str) -> torch.Tensor:
    """Mean over layers of the language-prior loss over the (valid) original-language tokens ``on_original``."""
    lprs = []
    for r in records.values():
        probs = torch.softmax(r.router_logits[on_original], dim=-1)
        if form == "paper":  # -log p_0
            lprs.append(-probs[:, 0].log().mean())
        else:  # cross-entropy applied to the probabilities: -log(exp(p_0) / sum_e exp(p_e))
            lprs.append((probs.exp().sum(-1).log() - probs[:, 0]).mean())
    return sum(lprs) / len(lprs)


def by_hand_classifier(records: dict[int, RoutingRecord], valid: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Mean over classifier layers of the cross-entropy of the valid tokens against OLD = 0 for original-language
    tokens, NEW = 1 for the others."""
    labels = (~original[valid]).long()
    losses = [-torch.log_softmax(r.classifier_logits[valid], -1).gather(1, labels.unsqueeze(1)).mean()
              for r in records.values() if r.classifier_logits is not None]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("form", ["reference", "normalized"])
def test_stage1_total_is_ce_plus_alpha_times_the_balance_of_the_routed_tokens(form):
    logits, ids, original, mask, records = loss_inputs()
    valid = mask.reshape(-1).bool()
    gated = by_hand_gated(records[0])
    assert (valid & gated).any() and (valid & ~gated).any()  # the classifier decides both ways
    balance = by_hand_balance(records, valid, form=form)
    assert balance > 0.5  # routed tokens: the term is not 0
    parts = stage_loss(1, logits, ids, records, original, TrainConfig(alpha=0.5, balance_form=form))
    assert parts.ce.item() == pytest.approx(by_hand_ce(logits, ids).item(), rel=1e-6)
    assert parts.balance.item() == pytest.approx(balance.item(), rel=1e-6)
    assert parts.total.item() == pytest.approx((by_hand_ce(logits, ids) + 0.5 * balance).item(), rel=1e-6)


@pytest.mark.parametrize("form", ["paper", "double_softmax"])
def test_stage2_total_is_ce_plus_gamma_lpr_on_original_tokens_plus_beta_classifier(form):
    logits, ids, original, mask, records = loss_inputs()
    valid, flat_original = mask.reshape(-1).bool(), original.reshape(-1)
    lpr_value = by_hand_lpr(records, valid & flat_original, form)
    classifier = by_hand_classifier(records, valid, flat_original)
    parts = stage_loss(2, logits, ids, records, original, TrainConfig(gamma=0.2, beta=0.3, lpr_form=form))
    assert parts.lpr.item() == pytest.approx(lpr_value.item(), rel=1e-6)
    assert parts.classifier.item() == pytest.approx(classifier.item(), rel=1e-6)
    expected = by_hand_ce(logits, ids) + 0.2 * lpr_value + 0.3 * classifier
    assert parts.total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_routing_stats_by_hand():
    # layer 0: 3 experts, no classifier; the last token is padding
    plain = record([[0.0] * 3] * 5, [[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]], valid=[True, True, True, True, False])
    # layer 1: 4 experts, a classifier that sends tokens 0 and 3 to expert 0 (class OLD wins)
    gated = record([[0.0] * 4] * 5, [[1, 2], [3, 1], [0, 1], [2, 1], [1, 3]],
                   classifier_logits=[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]],
                   sent=[True, False, False, True, False])
    original = torch.tensor([True, False, True, False, True])
    stats = RoutingStats()
    stats.add({0: plain, 1: gated}, original)
    summary = stats.summary()
    # layer 0: slots of the 4 valid tokens: expert 0 x3, 1 x2, 2 x3; original valid tokens 0 and 2, top-1 0 and 1
    assert summary[0] == LayerRouting(experts=3, load=[3, 2, 3], load_max_over_mean=pytest.approx(3 / (8 / 3)),
                                      dead_experts=0, original_top1_expert0=0.5, classifier_accuracy=None)
    # layer 1: gated tokens 0 and 3 count once for expert 0; routed tokens 1, 2, 4: 3 1 | 0 1 | 1 3;
    # original tokens 0 (gated: top-1 is 0), 2 (top-1 0), 4 (top-1 1); classifier right on tokens 0 and 1 of 5
    assert summary[1] == LayerRouting(experts=4, load=[3, 3, 0, 2], load_max_over_mean=1.5, dead_experts=1,
                                      original_top1_expert0=pytest.approx(2 / 3), classifier_accuracy=0.4)
    assert stats.one_line() == "load max/mean 1.31, dead experts 1, orig->expert0 58.3%, classifier acc 40.0%"
    stats.add({0: plain, 1: gated}, original)  # accumulates: counts double, shares stay
    assert stats.summary()[1].load == [6, 6, 0, 4] and stats.summary()[1].classifier_accuracy == 0.4
    assert RoutingStats().one_line() == "no MoE layers"


def test_lr_multiplier_by_hand():
    settings = StageTrainConfig(steps=10, warmup_steps=4, min_lr_ratio=0.1)
    # warmup: (step + 1) / 4; then 0.1 + 0.9 * (1 + cos(pi * (step - 4) / 6)) / 2
    expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 6: 0.1 + 0.9 * 0.75, 7: 0.55, 8: 0.1 + 0.9 * 0.25, 10: 0.1, 13: 0.1}
    for step, value in expected.items():
        assert lr_multiplier(step, settings) == pytest.approx(value, abs=1e-12), step
    no_warmup = StageTrainConfig(steps=4, warmup_steps=0, min_lr_ratio=0.0)
    assert [lr_multiplier(s, no_warmup) for s in range(5)] == pytest.approx([1.0, 0.5 + 0.5 * 2 ** -0.5, 0.5,
                                                                             0.5 - 0.5 * 2 ** -0.5, 0.0])


@pytest.mark.parametrize("chunk", [1, 10, 37, 0])
def test_chunked_cross_entropy_equals_full_logits(chunk):
    """The LM head applied a chunk at a time (recomputed in the backward) = full logits: loss and every gradient."""
    g = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(3, 19, 16, generator=g, requires_grad=True)
    torch.manual_seed(chunk)
    head = torch.nn.Linear(16, 50)
    ids = torch.randint(0, 50, (3, 19), generator=g)
    valid = torch.rand(3, 19, generator=g) > 0.3
    results = []
    for prediction in (head(hidden), HiddenStates(hidden, head, chunk)):
        loss = next_token_loss(prediction, ids, valid)
        results.append((loss, torch.autograd.grad(loss, [hidden, head.weight, head.bias])))
    (loss, grads), (chunked_loss, chunked_grads) = results
    assert chunked_loss.item() == pytest.approx(loss.item(), rel=1e-6)  # summed in another order: fp32 rounding
    for got, expected in zip(chunked_grads, grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    total, count = next_token_loss_sum(HiddenStates(hidden.detach(), head, chunk), ids, valid)
    assert count == valid[:, 1:].sum() and total.item() == pytest.approx(loss.item() * count.item(), rel=1e-6)


@pytest.mark.parametrize("training_stage", [1, 2])
def test_chunked_loss_and_activation_checkpointing_keep_the_loss_and_gradients(training_stage):
    """On a tiny two-round model with a classifier: the stage's loss parts and every trainable gradient are those
    of full logits without checkpointing, for the chunked loss alone and with activation checkpointing."""
    from test_expert_parallel import two_round_model

    from pipeline.hf_modeling.modeling_layermoe import moe_blocks, output_logits
    from pipeline.train import enable_activation_checkpointing
    from pipeline.upcycle import set_trainable

    ids = torch.randint(4, 400, (3, 16), generator=torch.Generator().manual_seed(5))
    original = torch.tensor([[True] * 16, [False] * 16, [True] * 16])
    results = {}
    for variant in ("logits", "chunked", "chunked + checkpointing"):
        model = two_round_model()
        model.set_classifiers_active(training_stage == 2)  # as the training stages do
        set_trainable(model, trainable_roles(training_stage, 2))
        if variant.endswith("checkpointing"):
            enable_activation_checkpointing(model)
        model.train()
        if variant == "logits":
            prediction = model(input_ids=ids, use_cache=False).logits
        else:
            hidden = model(input_ids=ids, use_cache=False, hidden_states_only=True).last_hidden_state
            prediction = HiddenStates(hidden, lambda x, model=model: output_logits(model, x), 5)
        records = {i: b.last_routing for i, b in moe_blocks(model).items()}
        parts = stage_loss(training_stage, prediction, ids, records, original, TrainConfig())
        parts.total.backward()
        results[variant] = (parts.as_floats(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    losses, grads = results["logits"]
    assert len(losses) == (3 if training_stage == 1 else 4) and all(g is not None for g in grads.values())
    for variant in ("chunked", "chunked + checkpointing"):
        assert results[variant][0] == pytest.approx(losses, rel=1e-6), variant
        for name, grad in grads.items():
            torch.testing.assert_close(results[variant][1][name], grad, rtol=1e-5, atol=1e-7, msg=f"{variant}: {name}")


# ---------------------------------------------------------------------------------------------------------
# training runs (tiny model, real DeepSpeed engine)
# ---------------------------------------------------------------------------------------------------------

def write_config(root: Path, run_dir: Path, model: str = "dense", sections: dict | None = None, **train) -> Path:
    """A run config for ``train_setup``'s model ``model``: round g1 adds el and hu to en; ``train`` updates the
    train section (``stage1``/``stage2`` their defaults here), ``sections`` replaces other top-level sections."""
    stage1 = dict(steps=30, lr=0.003, warmup_steps=2, micro_batch_size=4, block_length=48, tokens_per_language=15000)
    stage2 = dict(steps=40, lr=0.05, warmup_steps=2, micro_batch_size=4, block_length=48, tokens_per_language=6000,
                  replay_tokens_per_language=6000)
    stage1.update(train.pop("stage1", {}))
    stage2.update(train.pop("stage2", {}))
    body = {
        "name": "t", "run_dir": str(run_dir), "cache_dir": str(root / "cache"), "old_languages": ["en"],
        "rounds": [{"name": "g1", "languages": ["el", "hu"]}],
        "model": {"path": str(root / model)},
        "data": {"builtin_corpus": "none", "sources": {l: {"path": str(root / f"{l}.jsonl")} for l in ("en", "el", "hu")}},
        "analyze": {"tokens_per_language": 300, "max_length": 48},
        "evaluate": {"tokens_per_language": 960, "block_length": 48, "translation_sentences": 0},
        "allocate": {"method": "explicit", "explicit": [3, 2], "classifier_layers": [0, 1]},
        "train": {"stats_every": 10, "stage1": stage1, "stage2": stage2, **train},
        **(sections or {}),
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(json.dumps(body))
    return path


PREPARED_BY = ("name", "seed", "old_languages", "rounds", "model", "data", "analyze", "allocate", "upcycle")


def prepare(config: Path) -> None:
    """analyze, allocate and upcycle: the stages before training, run once per distinct setting of what they
    depend on (next to the model, under ``prepared/``) and copied into the config's run directory."""
    body = json.loads(config.read_text())
    key = json.dumps({k: body.get(k) for k in PREPARED_BY}, sort_keys=True)
    prepared = Path(body["model"]["path"]).parent / "prepared" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not prepared.exists():
        proc = run_cli(["run", str(config), "--until", "upcycle", f"run_dir={prepared}"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(prepared, body["run_dir"])


STEP_LINE = re.compile(r"stage (?P<stage>\d) step (?P<step>\d+)/\d+ \| loss (?P<loss>\S+) \| (?P<terms>.*?) \| "
                       r"lr (?P<lr>\S+) \|")


def step_log(log: str, stage: int) -> dict[int, dict[str, float]]:
    """Step -> what a training stage's log line for it says: ``total``, each loss part (unscaled) and ``lr``."""
    steps = {}
    for m in STEP_LINE.finditer(log):
        if int(m["stage"]) == stage:
            terms = re.sub(r"\(.*?\)", "", m["terms"]).split()
            steps[int(m["step"])] = {"total": float(m["loss"]), "lr": float(m["lr"]),
                                     **{name: float(value) for name, value in zip(terms[::2], terms[1::2])}}
    return steps


def eval_loss(model_dir: Path, root: Path, lang: str) -> float:
    from pipeline.packing import load_tokenizer
    from reference_data import pack_documents

    model = load_causal_lm(model_dir)
    blocks = pack_documents([(0, t) for t in synthetic_documents(lang, 40, seed=99)], load_tokenizer(model_dir), 48, [lang],
                            max_blocks=16)
    with torch.no_grad():
        return next_token_loss(model(blocks.input_ids).logits, blocks.input_ids).item()


LOAD_EXPORT = """
import sys
sys.modules["pipeline"] = None  # hidden: the export must load with transformers alone
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, text = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)  # the tokenizer needs no custom code
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype="auto")
ids = tokenizer(text, return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
print(json.dumps({"ids": ids[0].tolist(), "logits": logits[0, -1].float().tolist(), "generated": generated.shape[1],
                  "dtype": str(next(model.parameters()).dtype), "tokenizer": type(tokenizer).__name__}))
"""


def load_export_in_a_fresh_interpreter(directory: Path, text: str) -> dict:
    """Load an exported model and its tokenizer in a new interpreter (no ``pipeline``), from a neutral directory."""
    env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}
    proc = run_child([sys.executable, "-c", LOAD_EXPORT, str(directory), text], cwd=directory.parent, env=env,
                     timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "custom code" not in proc.stdout + proc.stderr  # no question about running the model's code
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_stage1_then_stage2_in_process(train_setup, tmp_path):
    run_dir = tmp_path / "run"
    # out-of-domain English: other text, plus 5 training documents that the evaluation must drop
    training_en = [json.loads(line)["text"] for line in (train_setup / "en.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "en_ood.jsonl", synthetic_documents("en", 60, seed=77) + training_en[:5])
    data = {"builtin_corpus": "none", "sources": {l: {"path": str(train_setup / f"{l}.jsonl")} for l in ("en", "el", "hu")},
            "ood_sources": {"en": {"path": str(tmp_path / "en_ood.jsonl")}}}
    tensorboard = installed("tensorboard")
    config = write_config(train_setup, run_dir, sections={"data": data}, tracking={"tensorboard": tensorboard})
    proc = run_cli(["run", str(config)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    g1 = run_dir / "g1"
    upcycled = load_causal_lm(g1 / "upcycle" / "model")
    stage1 = load_causal_lm(g1 / "train_stage1" / "model")
    stage2 = load_causal_lm(g1 / "train_stage2" / "model")

    # stage 1 lowers new-language loss; everything but round-1 experts and routers stays bit-identical
    assert eval_loss(g1 / "train_stage1" / "model", train_setup, "el") < eval_loss(g1 / "upcycle" / "model", train_setup, "el") - 0.05
    before, after = dict(parameter_roles(upcycled)), dict(parameter_roles(stage1))
    for role in ("original", "classifiers"):
        for (name, p0), (_, p1) in zip(before[role], after[role]):
            assert torch.equal(p0, p1), name
    assert any(not torch.equal(p0, p1) for (_, p0), (_, p1) in zip(before["experts_round1"], after["experts_round1"]))

    # the classifiers act from stage 2 on: stage 1 has no classifier figures, and every expert of the classifier
    # layers (here all MoE layers) got tokens in stage 1
    assert upcycled.config.classifiers_active is False and stage1.config.classifiers_active is False
    assert stage2.config.classifiers_active is True
    stats1 = json.loads((g1 / "train_stage1" / "routing_stats.json").read_text())
    assert all(v["classifier_accuracy"] is None and v["dead_experts"] == 0 for s in stats1 for v in s["layers"].values())
    assert "classifier acc" not in proc.stderr.split("stage 2")[0]
    manifest1 = json.loads((g1 / "train_stage1" / "manifest.json").read_text())
    assert manifest1["summary"]["trained_parameters"] == {
        "experts_round1": sum(p.numel() for _, p in after["experts_round1"]),
        "routers": sum(p.numel() for _, p in after["routers"])}

    # stage 2 trains routers + classifiers only
    s1_roles, s2_roles = dict(parameter_roles(stage1)), dict(parameter_roles(stage2))
    for role in ("original", "experts_round1"):
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(s1_roles[role], s2_roles[role]))
    stats2 = json.loads((g1 / "train_stage2" / "routing_stats.json").read_text())
    share = lambda s: sum(v["original_top1_expert0"] for v in s["layers"].values()) / len(s["layers"])
    accuracy = lambda s: sum(v["classifier_accuracy"] for v in s["layers"].values() if v["classifier_accuracy"] is not None) / 2
    # stage 2 raises the expert-0 share of original-language tokens and the classifier accuracy
    assert share(stats2[-1]) > share(stats2[0]) or share(stats2[-1]) > 0.95
    assert accuracy(stats2[-1]) > accuracy(stats2[0]) and accuracy(stats2[-1]) > 0.8
    assert "stage 1 step 30/30" in proc.stderr and "tok/s" in proc.stderr and "ETA" in proc.stderr
    # the learning rate logged for a step is the one that step used: warmup, then cosine decay
    for stage, lr in ((1, 0.003), (2, 0.05)):
        settings = StageTrainConfig(steps=30 if stage == 1 else 40, lr=lr, warmup_steps=2)
        logged = step_log(proc.stderr, stage)
        assert sorted(logged) == list(range(1, settings.steps + 1))
        for step, values in logged.items():
            assert values["lr"] == pytest.approx(lr * lr_multiplier(step - 1, settings), rel=5e-3), (stage, step)
    manifest = json.loads((g1 / "train_stage2" / "manifest.json").read_text())
    assert manifest["summary"]["steps"] == 40

    # metrics.jsonl: one line per step, every loss part unweighted and weighted, routing at statistics steps
    for stage, steps, parts in ((1, 30, {"balance": 0.01}), (2, 40, {"lpr": 0.1, "classifier": 0.1})):
        metrics = [json.loads(line) for line in (g1 / f"train_stage{stage}" / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, steps + 1))
        for m in metrics:
            assert m["total"] == pytest.approx(m["ce"] + sum(m[f"{p}_scaled"] for p in parts), rel=1e-5)
            assert all(m[f"{p}_scaled"] == pytest.approx(w * m[p]) for p, w in parts.items())
            assert m["grad_norm"] > 0 and m["lr"] > 0 and m["tokens_per_second"] > 0
        assert [m["step"] for m in metrics if "routing" in m] == list(range(10, steps + 1, 10))
        assert metrics[-1]["tokens"] == steps * 4 * 48 and metrics[-1]["elapsed_s"] > metrics[0]["elapsed_s"]
        assert metrics[-1]["total"] == pytest.approx(json.loads((g1 / f"train_stage{stage}" / "manifest.json")
                                                                .read_text())["summary"]["final_loss"]["total"])
    if tensorboard:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "logs" / "tensorboard" / "g1-stage1")).Reload()
        assert len(events.Scalars("loss/ce")) == 30 and len(events.Scalars("loss/balance_scaled")) == 30
        assert len(events.Scalars("routing/load_max_over_mean")) == 3 and events.Tags()["images"]

    # the log: a copy of the whole output in the run directory, headers with the time left, the table once
    run_log = next((run_dir / "logs").glob("*-run.log")).read_text()
    assert "\r" not in run_log and all(line.startswith("[") for line in run_log.splitlines() if line)
    assert "stage 2/8: g1/analyze (elapsed" in run_log and "stage 8/8: g1/export" in run_log
    assert "stage 1 step 30/30" in run_log and "router backend" in run_log
    assert proc.stdout.count("Report:") == 1 and proc.stdout.count("el    new") == 1

    # the whole run is up to date now; tracking settings are not result settings: changing them re-runs nothing
    tracking = ["train.tracking.wandb_project=another"] + (["train.tracking.tensorboard=false"] if tensorboard else [])
    again = run_cli(["run", str(config), *tracking])
    assert again.returncode == 0 and again.stderr.count("up to date") == 8, again.stderr[-3000:]

    # the report: perplexity of every model on every language, forgetting, routing, figures
    report = json.loads((g1 / "evaluate" / "report.json").read_text())
    assert list(report["perplexity"]) == ["base", "g1/stage1", "g1"]
    assert report["perplexity"]["g1"]["el"] < report["perplexity"]["base"]["el"]
    assert set(report["forgetting_percent"]["g1"]) == {"en"}
    assert set(report["ood_perplexity"]) == {"base", "g1/stage1", "g1"} and set(report["ood_perplexity"]["g1"]) == {"en"}
    assert report["forgetting_by_round"]["g1"]["en"]["ood_percent"] == pytest.approx(
        100 * (report["ood_perplexity"]["g1"]["en"] / report["ood_perplexity"]["base"]["en"] - 1))
    kept, dropped = map(int, re.search(r"en out-of-domain text: (\d+) documents \((\d) dropped: they occur in the "
                                       r"training text\)", proc.stderr).groups())
    assert kept + dropped == 65 and dropped >= 1  # the training documents of the train split are dropped
    assert set(report["routing"]["g1"]) == {"en", "el", "hu"}
    assert report["experts"]["g1"]["new_experts"] == 3
    assert report["parameters"]["g1"] > report["parameters"]["base"]
    md = (g1 / "evaluate" / "report.md").read_text()
    assert "| g1 |" in md and "perplexity.png" in md and "loss_g1.png" in md and "en (out-of-domain)" in md
    for png in ("routing_g1.png", "loss_g1.png", "perplexity.png", "g1_allocation.png"):
        assert (g1 / "evaluate" / png).stat().st_size > 10_000, png
    assert "Report:" in proc.stdout and "new experts in" in proc.stdout
    compare = run_cli(["compare", str(run_dir)])
    assert compare.returncode == 0 and "| run | g1 | 3 |" in compare.stdout and "old out-of-domain" in compare.stdout

    # the export: readable files, a model card, loads with transformers alone (fresh interpreter, no pipeline)
    exported = g1 / "export" / "model"
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~current_umask() for f in exported.iterdir())
    card = (exported / "README.md").read_text()
    for expected in ("## Base model", "| g1 | el, hu |", "| experts | 3 | 2 |", "| g1 | 1 | 30 | 5,760 |",
                     "## Evaluation", "trust_remote_code=True"):
        assert expected in card, expected
    text = synthetic_documents("el", 1, seed=5)[0]
    loaded = load_export_in_a_fresh_interpreter(exported, text)
    from pipeline.packing import load_tokenizer

    ids = load_tokenizer(g1 / "train_stage2" / "model")(text)["input_ids"]
    assert loaded["ids"] == ids and loaded["dtype"] == "torch.float32" and loaded["generated"] > len(ids)
    with torch.no_grad():
        expected_logits = stage2(torch.tensor([ids])).logits[0, -1]
    assert torch.equal(torch.tensor(loaded["logits"]), expected_logits)

    # a bf16 copy: export.dtype is a setting of the export only
    bf16 = run_cli(["run", str(config), "export.dtype=bfloat16"])
    assert bf16.returncode == 0 and bf16.stderr.count("up to date") == 7 and "g1/export: inputs or settings changed" \
        in bf16.stderr
    weights, reference = state(exported), state(g1 / "train_stage2" / "model")
    assert all(weights[k].dtype == torch.bfloat16 and torch.equal(weights[k], reference[k].to(torch.bfloat16))
               for k in reference)
    assert load_export_in_a_fresh_interpreter(exported, text)["dtype"] == "torch.bfloat16"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_resume_after_a_killed_run_gives_the_same_weights(train_setup, tmp_path):
    common = dict(model="dense_dropout", stage1=dict(steps=40), checkpoint_every=10)
    reference = write_config(train_setup, tmp_path / "ref", **common)
    prepare(reference)
    assert run_cli(["train", str(reference), "--stage", "1"]).returncode == 0

    killed = write_config(train_setup, tmp_path / "killed", **common)
    prepare(killed)
    env = clean_env()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(killed), "--stage", "1"], cwd=ROOT,
                            env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "checkpoint step10 saved" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stage_dir = tmp_path / "killed" / "g1" / "train_stage1"
    assert not stage_dir.exists()  # nothing half-written
    # resumed with other tracking settings (a run setting): the checkpoints are kept, the run continues
    resumed = run_cli(["train", str(killed), "--stage", "1", "train.tracking.wandb_project=elsewhere"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 10" in resumed.stderr
    a, b = state(tmp_path / "ref" / "g1" / "train_stage1" / "model"), state(stage_dir / "model")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # metrics.jsonl: exactly one line per step across the kill, the same losses as the uninterrupted run
    reference_metrics, resumed_metrics = (
        [json.loads(line) for line in (root / "g1" / "train_stage1" / "metrics.jsonl").read_text().splitlines()]
        for root in (tmp_path / "ref", tmp_path / "killed"))
    assert [m["step"] for m in resumed_metrics] == list(range(1, 41))
    assert [m["total"] for m in resumed_metrics] == [m["total"] for m in reference_metrics]
    assert [m["grad_norm"] for m in resumed_metrics] == [m["grad_norm"] for m in reference_metrics]
    tokens = [m["tokens"] for m in resumed_metrics]
    assert tokens == sorted(tokens) and tokens[-1] == reference_metrics[-1]["tokens"]


def torchrun(config: Path, stage: int, *overrides: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``stages/train.py`` on ``processes`` gloo ranks under torchrun."""
    proc = run_child([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                      "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "stages/train.py",
                      "--config", str(config), "--stage", str(stage), *overrides], cwd=ROOT, env=clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def assert_same_weights(a: Path, b: Path, exact: bool = False) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        if exact:
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("ds_config", ["ds_configs/zero1_fp32.json", "ds_configs/zero2_fp32.json",
                                       "ds_configs/cpu_fp32.json"])
def test_two_processes_match_one(train_setup, tmp_path, ds_config):
    """2 gloo ranks = 1 process with 2 accumulation steps: data parallel (ZeRO-1 / ZeRO-2; without ZeRO the
    gradient norm is this package's, over expert shards), and with ep_size=2 also expert parallel, with uneven
    experts (layer 0: 2 new experts, one per rank; layer 1: 1 new expert, so one rank holds none of that layer)."""
    one = write_config(train_setup, tmp_path / "one", ds_config=ds_config,
                       stage1=dict(steps=6, micro_batch_size=2, gradient_accumulation=2),
                       stage2=dict(steps=4, micro_batch_size=2, gradient_accumulation=2))
    prepare(one)
    g1 = tmp_path / "one" / "g1"
    for stage in (1, 2):
        proc = run_cli(["train", str(one), "--stage", str(stage)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        before = state(g1 / ("upcycle" if stage == 1 else "train_stage1") / "model")
        assert any(not torch.equal(before[k], v) for k, v in state(g1 / f"train_stage{stage}" / "model").items())
    for ep_size in (1, 2):
        two = write_config(train_setup, tmp_path / f"two_ep{ep_size}", ds_config=ds_config, ep_size=ep_size,
                           stage1=dict(steps=6, micro_batch_size=2, gradient_accumulation=1),
                           stage2=dict(steps=4, micro_batch_size=2, gradient_accumulation=1))
        prepare(two)
        for stage in (1, 2) if ep_size > 1 else (1,):  # stage 2 under expert parallelism: experts frozen but sharded
            proc = torchrun(two, stage)
            assert f"ep_size {ep_size}" in proc.stderr
            a, b = (root / f"train_stage{stage}" for root in (g1, tmp_path / f"two_ep{ep_size}" / "g1"))
            assert_same_weights(a / "model", b / "model")
            loss = [json.loads((d / "manifest.json").read_text())["summary"]["final_loss"] for d in (a, b)]
            assert loss[0] == pytest.approx(loss[1], rel=1e-5), ep_size  # the last step's loss over the whole batch
            # the gradient norm of every step is the whole batch's: the same in 1 and 2 processes
            norms = [[json.loads(line)["grad_norm"] for line in (d / "metrics.jsonl").read_text().splitlines()]
                     for d in (a, b)]
            assert norms[0] == pytest.approx(norms[1], rel=1e-4) and min(norms[0]) > 0, ep_size


def test_bf16_zero1_and_zero2_train_close_to_fp32(train_setup, tmp_path):
    """A few stage-1 and stage-2 steps in bf16 (ZeRO-1: DeepSpeed's BF16_Optimizer; ZeRO-2: its ZeRO optimizer,
    both with fp32 master weights) against fp32 from the same upcycled model. Tolerance 2% per step: bf16 keeps 8
    significant bits (relative rounding 2^-9), and the whole model, frozen weights and activations included, runs
    in bf16 (only the router, the norms and the loss compute in fp32); the measured gap is a few tenths of a percent."""
    steps = dict(stage1=dict(steps=4, warmup_steps=1), stage2=dict(steps=3, warmup_steps=1))
    prepared = write_config(train_setup, tmp_path / "prepared", **steps)
    prepare(prepared)
    losses = {}
    for ds_config in ("zero1_fp32", "zero1_bf16", "zero2_bf16"):
        run_dir = tmp_path / ds_config
        shutil.copytree(tmp_path / "prepared", run_dir)
        config = write_config(train_setup, run_dir, ds_config=f"ds_configs/{ds_config}.json", **steps)
        for stage in (1, 2):
            proc = run_cli(["train", str(config), "--stage", str(stage)])
            assert proc.returncode == 0, proc.stderr[-3000:]
            losses[ds_config, stage] = [line["total"] for _, line in sorted(step_log(proc.stderr, stage).items())]
        exported = state(run_dir / "g1" / "train_stage2" / "model")
        assert {t.dtype for t in exported.values()} == {torch.bfloat16 if "bf16" in ds_config else torch.float32}
    for ds_config in ("zero1_bf16", "zero2_bf16"):
        for stage, count in ((1, 4), (2, 3)):
            reference, got = losses["zero1_fp32", stage], losses[ds_config, stage]
            assert len(got) == len(reference) == count
            assert got == pytest.approx(reference, rel=0.02), (ds_config, stage, got, reference)
            assert got != reference  # it really ran in another precision


def cut_back(checkpoints: Path, exported: Path, step: int) -> None:
    """What an interruption right after checkpoint ``step`` leaves: no later checkpoint, no exported stage."""
    for tag in checkpoints.glob("step*"):
        if int(tag.name.removeprefix("step")) > step:
            shutil.rmtree(tag)
    (checkpoints / "latest").write_text(f"step{step}")
    shutil.rmtree(exported)


# Adam's step per element is at most lr * (1 - beta1) / sqrt(1 - beta2) (Kingma & Ba, 2.1), with AdamW's defaults
ADAM_STEP_BOUND = (1 - 0.9) / math.sqrt(1 - 0.999)


@pytest.mark.parametrize("ds_config, mid_run_in_another_layout", [("ds_configs/cpu_fp32.json", True),
                                                                   ("ds_configs/zero2_fp32.json", False)])
def test_expert_parallel_checkpoints_resume_and_load_into_one_process(train_setup, tmp_path, ds_config,
                                                                      mid_run_in_another_layout):
    """ep_size=2 on 2 ranks, a model with attention dropout, 6 steps with a checkpoint after step 3. (Resuming in
    another layout does not depend on the ZeRO stage: DeepSpeed's checkpoint is not read then; once is enough.)"""
    config = write_config(train_setup, tmp_path / "ep", model="dense_dropout", ds_config=ds_config, ep_size=2,
                          checkpoint_every=3, stage1=dict(steps=6, micro_batch_size=2))
    prepare(config)
    first = step_log(torchrun(config, 1).stderr, 1)
    g1 = tmp_path / "ep" / "g1"
    checkpoints, exported = g1 / "train_stage1.checkpoints", g1 / "train_stage1"
    shutil.copytree(exported / "model", tmp_path / "uninterrupted")
    for tag in ("step3", "step6"):
        assert {f.name for f in (checkpoints / tag).glob("experts_ep*")} == {"experts_ep0.safetensors",
                                                                              "experts_ep1.safetensors"}
    # the ep_size=2 checkpoint of step 6 in one process with ep_size=1: the same weights
    shutil.rmtree(exported)
    proc = run_cli(["train", str(config), "--stage", "1", "train.ep_size=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with another layout" in proc.stderr and "at step 6" in proc.stderr
    assert_same_weights(tmp_path / "uninterrupted", exported / "model", exact=True)

    # interrupted after step 3: resuming with the same layout continues exactly (dropout: the RNG too)
    cut_back(checkpoints, exported, 3)
    proc = torchrun(config, 1)
    assert "at step 3" in proc.stderr
    assert step_log(proc.stderr, 1) == {step: first[step] for step in (4, 5, 6)}
    assert_same_weights(tmp_path / "uninterrupted", exported / "model", exact=True)

    if not mid_run_in_another_layout:
        return
    # ... and with another layout (ep_size=1 on the 2 ranks): steps 4-6 run with the uninterrupted run's learning
    # rates; step 4 computes its loss with the weights of step 3, on the same batch, with the same dropout masks
    # (only if the RNG is restored), so the loss is the uninterrupted run's; the optimizer moments start over
    cut_back(checkpoints, exported, 3)
    proc = torchrun(config, 1, "train.ep_size=1")
    assert "with another layout" in proc.stderr and "at step 3" in proc.stderr
    resumed = step_log(proc.stderr, 1)
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[step]["lr"] for step in (4, 5, 6)] == [first[step]["lr"] for step in (4, 5, 6)]
    assert resumed[4] == pytest.approx(first[4], abs=2e-4)  # 4 decimals logged; ep_size 1 vs 2: float rounding
    # frozen weights are untouched; trained ones differ from the uninterrupted run's by at most the sum of both
    # runs' Adam steps over steps 4-6 (the moments differ, nothing else does)
    bound = 2 * ADAM_STEP_BOUND * sum(first[step]["lr"] for step in (4, 5, 6))
    uninterrupted, other = (dict(parameter_roles(load_causal_lm(path)))
                            for path in (tmp_path / "uninterrupted", exported / "model"))
    for role, params in uninterrupted.items():
        for (name, a), (_, b) in zip(params, other[role]):
            if role in trainable_roles(1, 1):
                assert (a - b).abs().max() <= bound, name
            else:
                assert torch.equal(a, b), name


def test_four_ranks_in_two_expert_parallel_groups_match_one_process(train_setup, tmp_path):
    """ep_size=2 on 4 ranks: expert-parallel groups [0, 1] and [2, 3], expert-data-parallel groups [0, 2] and
    [1, 3], so a rank's place in its group is not its global rank and every expert's gradient is averaged over two
    ranks. Equals one process with 4 accumulation steps; a mid-run checkpoint (each rank reads its group's expert
    shard) resumes exactly."""
    no_classifiers = {"allocate": {"method": "explicit", "explicit": [3, 2], "classifier_layers": []}}  # all routed
    one = write_config(train_setup, tmp_path / "one", sections=no_classifiers, ds_config="ds_configs/zero2_fp32.json",
                       stage1=dict(steps=4, micro_batch_size=2, gradient_accumulation=4))
    four = write_config(train_setup, tmp_path / "four", sections=no_classifiers, ds_config="ds_configs/zero2_fp32.json",
                        ep_size=2, checkpoint_every=2, stage1=dict(steps=4, micro_batch_size=2))
    for config in (one, four):
        prepare(config)
    proc = run_cli(["train", str(one), "--stage", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun(four, 1, processes=4)
    assert "world 4, ep_size 2" in proc.stderr
    g1 = tmp_path / "four" / "g1"
    assert_same_weights(tmp_path / "one" / "g1" / "train_stage1" / "model", g1 / "train_stage1" / "model")
    before, after = (dict(parameter_roles(load_causal_lm(g1 / d / "model"))) for d in ("upcycle", "train_stage1"))
    assert all(not torch.equal(a, b) for (_, a), (_, b) in zip(before["experts_round1"], after["experts_round1"]))
    shutil.copytree(g1 / "train_stage1" / "model", tmp_path / "uninterrupted")
    cut_back(g1 / "train_stage1.checkpoints", g1 / "train_stage1", 2)
    proc = torchrun(four, 1, processes=4)
    assert "at step 2" in proc.stderr
    assert_same_weights(tmp_path / "uninterrupted", g1 / "train_stage1" / "model", exact=True)


def test_ctrl_c_stops_with_status_130_and_leaves_no_partial_stage(train_setup, tmp_path):
    config = write_config(train_setup, tmp_path / "int", stage1=dict(steps=1000))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=ROOT, env=clean_env(),
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "stage 1 step 2/1000" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest[-3000:]
    assert "ERROR: interrupted" in rest and "Traceback" not in rest
    g1 = tmp_path / "int" / "g1"
    assert (g1 / "upcycle" / "manifest.json").exists() and not (g1 / "train_stage1").exists()
    assert not [p.name for p in g1.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_ep_size_must_divide_the_number_of_processes(train_setup, tmp_path):
    config = write_config(train_setup, tmp_path / "bad", ep_size=2)
    prepare(config)
    proc = run_cli(["train", str(config), "--stage", "1"])
    assert proc.returncode == 2 and "train.ep_size=2 does not divide the number of processes (1)" in proc.stderr


def test_nan_loss_stops_with_a_clear_message(train_setup, tmp_path):
    config = write_config(train_setup, tmp_path / "nan", stage1=dict(steps=5, lr=1e30, warmup_steps=0), checkpoint_every=1)
    prepare(config)
    proc = run_cli(["train", str(config), "--stage", "1"])
    assert proc.returncode == 2
    # lr 1e30: the weights after step 1 (checkpoint step1) already give a non-finite loss: no good checkpoint
    assert re.search(r"non-finite loss \{.*\} at step 2; stopping, nothing exported\. There is no checkpoint from "
                     r"before it: run again with other settings", proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "nan" / "g1" / "train_stage1").exists()


def test_a_corrupt_checkpoint_is_a_clear_error(train_setup, tmp_path):
    config = write_config(train_setup, tmp_path / "corrupt", stage1=dict(steps=2))
    prepare(config)
    assert run_cli(["train", str(config), "--stage", "1"]).returncode == 0
    stage_dir = tmp_path / "corrupt" / "g1" / "train_stage1"
    shutil.rmtree(stage_dir)
    states = tmp_path / "corrupt" / "g1" / "train_stage1.checkpoints" / "step2" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    proc = run_cli(["train", str(config), "--stage", "1"])
    assert proc.returncode == 2 and "cannot read checkpoint" in proc.stderr and "corrupt?" in proc.stderr
    assert "Traceback" not in proc.stderr and not stage_dir.exists()


@pytest.mark.parametrize("expansion", ["dense_full", "dense_ffn", "lora"])
def test_dense_baselines_train_the_dense_model(train_setup, tmp_path, expansion):
    """The dense baselines skip analyze/allocate/upcycle, train the dense model's own weights (all, the FFNs, or
    LoRA adapters merged at export) on CE, and export plain dense HF models; LoRA also runs stage 2 (the same
    parameters) and the evaluation."""
    run_dir = tmp_path / expansion
    config = write_config(train_setup, run_dir, stage1=dict(steps=3), stage2=dict(steps=2, lr=0.003))
    until = [] if expansion == "lora" else ["--until", "train_stage1"]
    proc = run_cli(["run", str(config), f"expansion={expansion}", "train.lora.rank=4", *until])
    assert proc.returncode == 0, proc.stderr[-4000:]
    g1 = run_dir / "g1"
    assert not (g1 / "analyze").exists() and not (g1 / "upcycle").exists()
    assert "g1/upcycle: skipped (expansion" in proc.stderr
    base, s1 = state(train_setup / "dense"), state(g1 / "train_stage1" / "model")
    assert base.keys() == s1.keys()  # a plain dense model (LoRA merged)
    assert json.loads((g1 / "train_stage1" / "model" / "config.json").read_text())["model_type"] == "llama"
    changed = {k for k in base if not torch.equal(base[k], s1[k])}
    if expansion == "dense_ffn":
        assert changed == {k for k in base if ".mlp." in k}
    elif expansion == "dense_full":
        assert changed == set(base)
    else:  # LoRA on every linear layer but the LM head: their weights moved, norms and embeddings did not
        assert changed and all(k.endswith("proj.weight") for k in changed)
    trained = json.loads((g1 / "train_stage1" / "manifest.json").read_text())["summary"]["trained_parameters"]
    dense = load_causal_lm(train_setup / "dense")
    expected = {"dense_full": sum(p.numel() for p in dense.parameters()),
                "dense_ffn": sum(p.numel() for n, p in dense.named_parameters() if ".mlp." in n),
                # rank 4 x (in + out) per adapted linear layer: q, k, v, o, gate, up, down of both layers
                "lora": 4 * sum(m.in_features + m.out_features for n, m in dense.named_modules()
                                if isinstance(m, torch.nn.Linear) and n != "lm_head")}[expansion]
    assert trained == {expansion: expected}
    if expansion == "lora":
        s2 = state(g1 / "train_stage2" / "model")
        assert s2.keys() == base.keys() and any(not torch.equal(s1[k], s2[k]) for k in s1)
        report = json.loads((g1 / "evaluate" / "report.json").read_text())
        assert list(report["perplexity"]) == ["base", "g1/stage1", "g1"] and not report["experts"]
