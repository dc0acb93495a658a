"""Expert parallelism with uneven expert counts: placement, and 2-process gloo runs against one process."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessException

from pipeline.ranks import free_port
from pipeline.expert_parallel import (DeepSpeedMoEMarker, ExpertPlacement, RemoteExpert, expert_parallel_forward,
                                      expert_parallel_group, mark_expert_parameters, owned_expert_state,
                                      place_experts, shard_block, shard_model, unshard_model)
from pipeline.hf_modeling.modeling_layermoe import LayerMoEBlock, moe_blocks

HIDDEN, FFN = 8, 16
TOKENS = (13, 9)  # tokens on rank 0 and rank 1
ATOL = RTOL = 1e-5


# ---------------------------------------------------------------- placement (single process)

def one_round(num_experts: int, ep_size: int) -> ExpertPlacement:
    """The placement of a layer whose new experts all come from one round."""
    return place_experts([[0] + [1] * (num_experts - 1)], ep_size)[0]


@pytest.mark.parametrize("num_experts, ep_size",
                         [(2, 2), (3, 2), (4, 2), (6, 2), (7, 3), (3, 4), (2, 4), (11, 4), (5, 1), (1, 3)])
def test_one_round_is_dealt_evenly(num_experts, ep_size):
    placement = one_round(num_experts, ep_size)
    owned = [placement.owned(r) for r in range(ep_size)]
    assert sorted(e for chunk in owned for e in chunk) == list(range(1, num_experts))  # each new expert once
    sizes = [len(c) for c in owned]
    assert max(sizes) - min(sizes) <= 1
    for rank, chunk in enumerate(owned):
        assert placement.local_experts(rank) == (0, *chunk)
        assert all(placement.owner(e) == rank for e in chunk)


def test_rounds_and_layers_are_spread_over_the_ranks():
    # layer 0: 2 experts of round 1, 3 of round 2; layer 1: 1 of round 1, 1 of round 2; layer 2: 3 of round 2
    rounds = [[0, 1, 1, 2, 2, 2], [0, 1, 2], [0, 2, 2, 2]]
    for ep_size in (2, 3, 4):
        placements = place_experts(rounds, ep_size)
        for r in (1, 2):
            per_rank = [sum(rounds[i][e] == r for i, p in enumerate(placements) for e in p.owned(rank))
                        for rank in range(ep_size)]
            assert max(per_rank) - min(per_rank) <= 1, (ep_size, r, per_rank)  # every stage's work is balanced
            for i, p in enumerate(placements):  # and so is every layer's share of one round
                in_layer = [sum(rounds[i][e] == r for e in p.owned(rank)) for rank in range(ep_size)]
                assert max(in_layer) - min(in_layer) <= 1
    # rank 1 gets a round-2 expert even though round 1 filled the ranks unevenly
    assert [p.owners for p in place_experts(rounds, 2)] == [(0, 1, 1, 0, 1), (0, 0), (1, 0, 1)]


def test_placement_errors():
    with pytest.raises(ValueError, match="no single owner"):
        one_round(3, 2).owner(0)
    with pytest.raises(ValueError, match="not in an expert-parallel group"):
        one_round(3, 2).local_experts(2)
    with pytest.raises(ValueError, match="do not fit"):
        ExpertPlacement((0, 2), 2)


# ---------------------------------------------------------------- helpers

def make_expert() -> nn.Module:
    return nn.Sequential(nn.Linear(HIDDEN, FFN), nn.SiLU(), nn.Linear(FFN, HIDDEN))


def route(gen: torch.Generator, tokens: int, num_experts: int, allowed: tuple[int, ...], k: int = 2):
    """Top-k assignments over random logits restricted to ``allowed``: (token_index, expert_index, weight)."""
    logits = torch.full((tokens, num_experts), float("-inf"))
    logits[:, list(allowed)] = torch.randn(tokens, len(allowed), generator=gen)
    k = min(k, len(allowed))
    weights, experts = torch.softmax(logits, -1).topk(k)
    token_index = torch.arange(tokens).unsqueeze(1).expand(-1, k).reshape(-1)
    return token_index, experts.reshape(-1), (weights / weights.sum(-1, keepdim=True)).reshape(-1)


def reference(x, experts, token_index, expert_index, weight):
    """Per assignment: ``y[t] += w * experts[e](x[t])``."""
    rows = [w * experts[e](x[t:t + 1]) for t, e, w in zip(token_index.tolist(), expert_index.tolist(), weight)]
    return torch.zeros_like(x).index_add(0, token_index, torch.cat(rows)) if rows else torch.zeros_like(x)


def grad_or_zero(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def summed_grad(p: torch.Tensor) -> torch.Tensor:
    """The gradient summed over the ranks (what data parallelism reduces for a replicated parameter)."""
    grad = grad_or_zero(p).clone()
    dist.all_reduce(grad)
    return grad


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- expert_parallel_forward

# skewed: rank 1 routes only to its own experts (sends nothing, still receives); all_local: nothing moves;
# rank1_empty: rank 1 has no assignments at all; frozen: x and expert 0 need no grad, so for E=2 rank 1 (which
# owns no expert) has nothing differentiable to send back, and the backward must still meet on both ranks.
ROUTINGS = ("random", "skewed", "all_local", "rank1_empty", "frozen")


def _check_forward_backward(rank: int) -> None:
    for num_experts in (2, 3, 4, 6):
        placement = one_round(num_experts, 2)
        for seed, routing in enumerate(ROUTINGS):
            case = f"E={num_experts} {routing} rank {rank}"
            gen = torch.Generator().manual_seed(100 * num_experts + seed)
            torch.manual_seed(seed)
            experts = [make_expert() for _ in range(num_experts)]
            if routing == "frozen":
                experts[0].requires_grad_(False)
            per_rank = []
            for r, tokens in enumerate(TOKENS):
                x = torch.randn(tokens, HIDDEN, generator=gen)
                everything = tuple(range(num_experts))
                allowed = {"skewed": placement.local_experts(r) if r == 1 else everything,
                           "all_local": placement.local_experts(r)}.get(routing, everything)
                token_index, expert_index, weight = route(gen, tokens, num_experts, allowed)
                if routing == "rank1_empty" and r == 1:
                    token_index, expert_index, weight = token_index[:0], expert_index[:0], weight[:0]
                per_rank.append((x, token_index, expert_index, weight, torch.randn(tokens, HIDDEN, generator=gen)))

            # one process on the concatenation of both ranks' data
            x_ref = torch.cat([p[0] for p in per_rank]).requires_grad_(routing != "frozen")
            offsets = (0, TOKENS[0])
            tokens_ref = torch.cat([p[1] + off for p, off in zip(per_rank, offsets)])
            weight_ref = torch.cat([p[3] for p in per_rank]).requires_grad_()
            experts_ref = copy.deepcopy(experts)
            y_ref = reference(x_ref, experts_ref, tokens_ref, torch.cat([p[2] for p in per_rank]), weight_ref)
            (y_ref * torch.cat([p[4] for p in per_rank])).sum().backward()

            # this rank's share
            x, token_index, expert_index, weight, probe = per_rank[rank]
            x = x.clone().requires_grad_(routing != "frozen")
            weight = weight.clone().requires_grad_()
            local = {e: experts[e] for e in placement.local_experts(rank)}
            y = expert_parallel_forward(x, local, token_index, expert_index, weight, placement)
            mine = slice(offsets[rank], offsets[rank] + TOKENS[rank])
            close(y, y_ref[mine], f"{case}: output")
            with torch.no_grad():
                close(expert_parallel_forward(x, local, token_index, expert_index, weight, placement),
                      y_ref[mine], f"{case}: output without grad")
            (y * probe).sum().backward()
            if routing != "frozen":
                close(x.grad, x_ref.grad[mine], f"{case}: grad of x")
            first = 0 if rank == 0 else len(per_rank[0][1])
            close(weight.grad, weight_ref.grad[first:first + len(weight)], f"{case}: grad of the routing weights")
            for e in placement.owned(rank):
                for p, p_ref in zip(experts[e].parameters(), experts_ref[e].parameters()):
                    close(grad_or_zero(p), grad_or_zero(p_ref), f"{case}: grad of expert {e}")
            if routing != "frozen":
                for p, p_ref in zip(experts[0].parameters(), experts_ref[0].parameters()):
                    close(summed_grad(p), grad_or_zero(p_ref), f"{case}: summed grad of expert 0")


def test_expert_parallel_forward_and_backward_equal_one_process(two_ranks):
    two_ranks("forward_backward")


def test_one_rank_group_is_the_local_computation():
    torch.manual_seed(0)
    experts = [make_expert() for _ in range(3)]
    x = torch.randn(7, HIDDEN)
    token_index, expert_index, weight = route(torch.Generator().manual_seed(0), 7, 3, (0, 1, 2))
    y = expert_parallel_forward(x, dict(enumerate(experts)), token_index, expert_index, weight, one_round(3, 1))
    close(y, reference(x, experts, token_index, expert_index, weight), "output")
    with pytest.raises(ValueError, match="placement is for 2 ranks"):
        expert_parallel_forward(x, dict(enumerate(experts)), token_index, expert_index, weight, one_round(3, 2))


# ---------------------------------------------------------------- shard_block

def make_block(num_experts: int, classifier: bool) -> LayerMoEBlock:
    torch.manual_seed(num_experts)
    block = LayerMoEBlock(make_expert(), num_experts, HIDDEN, top_k=2, classifier=classifier)
    with torch.no_grad():  # copies that differ from the original, as after training
        for expert in list(block.experts)[1:]:
            for p in expert.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return block


def _check_shard_block(rank: int) -> None:
    for num_experts, classifier in ((2, False), (3, False), (4, True), (6, False)):
        case = f"E={num_experts} classifier={classifier} rank {rank}"
        block = make_block(num_experts, classifier)
        reference_block = copy.deepcopy(block)
        gen = torch.Generator().manual_seed(num_experts)
        hidden, probe = torch.randn(4, 5, HIDDEN, generator=gen), torch.randn(4, 5, HIDDEN, generator=gen)
        hidden_ref = hidden.clone().requires_grad_()
        (reference_block(hidden_ref) * probe).sum().backward()

        placement = one_round(num_experts, 2)
        shard_block(block, placement)
        for e in range(1, num_experts):
            assert isinstance(block.experts[e], RemoteExpert) == (e not in placement.local_experts(rank)), case
        assert {k.split(".")[1] for k in block.state_dict() if k.startswith("experts.")} == \
            {str(e) for e in placement.local_experts(rank)}, case
        mine = slice(2 * rank, 2 * rank + 2)
        x = hidden[mine].clone().requires_grad_()
        y = block(x)
        close(y, reference_block(hidden)[mine].detach(), f"{case}: output")
        (y * probe[mine]).sum().backward()
        close(x.grad, hidden_ref.grad[mine], f"{case}: grad of the input")
        close(summed_grad(block.router.weight), reference_block.router.weight.grad, f"{case}: summed router grad")
        for e in placement.local_experts(rank):
            for p, p_ref in zip(block.experts[e].parameters(), reference_block.experts[e].parameters()):
                got = summed_grad(p) if e == 0 else grad_or_zero(p)
                close(got, grad_or_zero(p_ref), f"{case}: grad of expert {e}")


def test_sharded_block_equals_the_full_block(two_ranks):
    two_ranks("shard_block")


def two_round_model():
    """A tiny two-round LayerMoE model (classifier in layer 1) whose experts differ, as after training."""
    from test_moe import dense_model, perturb_experts

    from pipeline.upcycle import ExpansionRound, grow, upcycle

    model = grow(upcycle(dense_model(layers=3), ExpansionRound("g1", ["el"], [2, 3, 1], [1]), ["en"]),
                 ExpansionRound("g2", ["hi"], [2, 2, 3], [1]))
    perturb_experts(model, 0.2)
    return model


def _check_shard_model(rank: int) -> None:
    """A two-round model sharded over 2 ranks: same logits; the ranks' shards put the whole model back together."""
    model = two_round_model()
    reference = copy.deepcopy(model)
    ids = torch.randint(4, 400, (4, 12), generator=torch.Generator().manual_seed(3))
    placements = shard_model(model, dist.group.WORLD)
    assert sorted(placements) == [0, 1, 2]
    with torch.no_grad():
        close(model(ids[2 * rank:2 * rank + 2]).logits, reference(ids[2 * rank:2 * rank + 2]).logits, "sharded logits")
    shards = [None, None]
    dist.all_gather_object(shards, owned_expert_state(model))
    assert not set(shards[0]) & set(shards[1]) and all(shards)
    unshard_model(model, {**shards[0], **shards[1]})
    full = model.state_dict()
    assert full.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(full[key], value), key
    with torch.no_grad():  # local again: no collective, each rank alone
        close(model(ids).logits, reference(ids).logits, "unsharded logits")


def test_sharded_model_equals_the_full_model_and_shards_reassemble(two_ranks):
    two_ranks("shard_model")


def _check_load_sharded(rank: int) -> None:
    """Rank-local loading (meta device, only this rank's experts read) = loading everything, then sharding."""
    from pipeline.base_model import load_causal_lm
    from pipeline.export import export_model
    from pipeline.expert_parallel import load_sharded_model

    directory = Path(tempfile.gettempdir()) / f"layermoe-load-sharded-{os.environ['MASTER_PORT']}"
    if rank == 0:
        export_model(two_round_model(), directory)
    dist.barrier()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            reference = load_causal_lm(directory, str(dtype).removeprefix("torch."))
            reference_placements = shard_model(reference, dist.group.WORLD)
            model, placements = load_sharded_model(directory, dtype, "cpu", dist.group.WORLD)
            assert placements == reference_placements and not model.training
            got, expected = model.state_dict(), reference.state_dict()
            assert got.keys() == expected.keys() and any("experts.2" in k for k in got)
            for key, value in expected.items():
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{dtype} {key}"
            buffers = dict(reference.named_buffers())  # non-persistent ones too (rotary tables)
            for key, value in model.named_buffers():
                assert torch.equal(value, buffers[key]), key
            assert model.base.lm_head.weight.data_ptr() == model.base.model.embed_tokens.weight.data_ptr() or \
                not model.config.base_config.get("tie_word_embeddings")
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(directory)


def test_rank_local_loading_equals_load_then_shard(two_ranks):
    two_ranks("load_sharded")


def _check_activation_checkpointing(rank: int) -> None:
    """With expert parallelism, recomputing each decoder layer in the backward (its all-to-alls included, on both
    ranks) gives the loss and gradients of keeping the activations, for both stages' losses."""
    from pipeline.config import TrainConfig
    from pipeline.hf_modeling.modeling_layermoe import output_logits
    from pipeline.losses import HiddenStates, stage_loss
    from pipeline.train import enable_activation_checkpointing, trainable_roles
    from pipeline.upcycle import set_trainable

    gen = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(4, 400, (2, 12), generator=gen)
    original = torch.zeros(2, 12, dtype=torch.bool)
    original[rank] = True  # one original-language sequence per rank
    for training_stage in (1, 2):
        results = []
        for checkpointing in (False, True):
            model = two_round_model()
            shard_model(model, dist.group.WORLD)
            set_trainable(model, trainable_roles(training_stage, 2))
            if checkpointing:
                enable_activation_checkpointing(model)
            model.train()
            kept = []  # what autograd keeps outside checkpointed regions (inside them the checkpoint decides)
            with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
                hidden = model(input_ids=ids, use_cache=False, hidden_states_only=True).last_hidden_state
            records = {i: b.last_routing for i, b in moe_blocks(model).items()}
            parts = stage_loss(training_stage, HiddenStates(hidden, lambda x: output_logits(model, x), 7), ids,
                               records, original, TrainConfig())
            parts.total.backward()
            grads = {n: grad_or_zero(p) for n, p in model.named_parameters() if p.requires_grad}
            results.append((parts.as_floats(), grads, sum(kept)))
        (losses, grads, kept), (losses_ckpt, grads_ckpt, kept_ckpt) = results
        assert kept_ckpt < kept / 4, (kept_ckpt, kept)  # the layers' activations really were not kept
        assert losses == pytest.approx(losses_ckpt, rel=1e-6, abs=1e-7), (training_stage, losses, losses_ckpt)
        assert grads.keys() == grads_ckpt.keys() and any("experts" in n for n in grads) == (training_stage == 1)
        for name in grads:
            close(grads_ckpt[name], grads[name], f"stage {training_stage} rank {rank}: grad of {name}")


def test_activation_checkpointing_with_expert_parallelism_keeps_loss_and_gradients(two_ranks):
    two_ranks("activation_checkpointing")


# ---------------------------------------------------------------- DeepSpeed

class OneBlock(nn.Module):
    def __init__(self, block: LayerMoEBlock):
        super().__init__()
        self.block = block

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.block(hidden)


def _check_deepspeed(rank: int) -> None:
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    group = expert_parallel_group(2)
    assert dist.get_process_group_ranks(group) == [0, 1]
    for stage in (0, 2):
        block = make_block(4, classifier=False)  # rank 0 owns experts 1 and 3, rank 1 owns expert 2
        block.experts[0].requires_grad_(False)
        reference_block = copy.deepcopy(block)
        gen = torch.Generator().manual_seed(stage)
        hidden, probe = torch.randn(4, 5, HIDDEN, generator=gen), torch.randn(4, 5, HIDDEN, generator=gen)
        (reference_block(hidden) * probe).sum().backward()
        reference_grads = {f"block.{n}": p.grad for n, p in reference_block.named_parameters() if p.requires_grad}

        model = OneBlock(block)
        shard_block(block, one_round(4, 2), group)
        tagged = mark_expert_parameters(model, ep_size=2)
        assert tagged == (8 if rank == 0 else 4)  # 4 tensors per expert
        assert isinstance(block.deepspeed_moe_marker, DeepSpeedMoEMarker)
        assert not hasattr(block.experts[0][0].weight, "allreduce")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        param_groups = split_params_into_different_moe_groups_for_optimizer({"params": trainable, "name": "dense"})
        optimizer = torch.optim.SGD(param_groups, lr=1.0)
        clip = 1.0 if stage == 2 else 0.0  # ZeRO 0 clips by the mean of the ranks' own norms (DeepSpeed's rule)
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": clip,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        assert engine.has_moe_layers
        mine = slice(2 * rank, 2 * rank + 2)
        out = engine(hidden[mine])
        engine.backward((out * probe[mine]).sum())
        engine.step()
        mean_grads = {name: grad / 2 for name, grad in reference_grads.items()}  # data-parallel mean
        norm = torch.sqrt(sum(g.square().sum() for g in mean_grads.values()))  # all experts, both ranks
        scale = min(1.0, clip / (norm.item() + 1e-6)) if clip else 1.0
        for name, p in model.named_parameters():  # SGD, lr 1: the step is minus the clipped mean gradient
            expected = before[name] - scale * mean_grads[name] if name in mean_grads else before[name]
            close(p.detach(), expected, f"ZeRO {stage} rank {rank}: {name} after one step")


def test_deepspeed_reduces_expert_gradients_over_the_expert_data_parallel_group(two_ranks):
    two_ranks("deepspeed")


# ---------------------------------------------------------------- one 2-process gloo run for all the checks above

CHECKS = {"forward_backward": _check_forward_backward, "shard_block": _check_shard_block,
          "shard_model": _check_shard_model, "load_sharded": _check_load_sharded,
          "activation_checkpointing": _check_activation_checkpointing, "deepspeed": _check_deepspeed}


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))  # a deadlock fails
    try:
        for name, check in CHECKS.items():
            try:
                check(rank)
            except Exception:
                results[name, rank] = traceback.format_exc()
                raise  # the other rank may wait in a collective: spawn stops it
            results[name, rank] = "ok"
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    """Runs every check once in two processes (starting them costs more than the checks); returns a function
    that fails a test whose check failed on either rank, or did not run because an earlier one failed."""
    with mp.Manager() as manager:
        shared = manager.dict()
        try:
            mp.spawn(_worker, args=(free_port(), shared), nprocs=2, join=True)
        except ProcessException:
            pass  # reported per check below
        results = dict(shared)

    def outcome(name: str) -> None:
        for rank in (0, 1):
            result = results.get((name, rank), "did not run (an earlier check failed or a process died)")
            if result != "ok":
                pytest.fail(f"rank {rank}: {result}", pytrace=False)

    return outcome
