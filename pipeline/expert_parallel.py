"""Expert parallelism for ``LayerMoEBlock`` where a layer's expert count need not divide the group size.

* ``ExpertPlacement`` / ``place_experts``: expert 0 (the frozen original FFN) is replicated on every rank; the
  new experts are dealt to the ranks of the expert-parallel group round by round, so the experts one training
  stage updates are spread evenly (a rank may hold none of a given layer).
* ``expert_parallel_forward``: the dropless grouped forward of ``grouped_expert_forward`` with every expert
  run on its owner. Assignments to local experts (expert 0 and the owned ones) never leave their rank; the
  others travel in one uneven all-to-all (after a small all-to-all of counts) and come back in a second one.
  Differentiable with respect to the input, the routing weights and the owners' expert parameters.
* ``shard_model`` / ``shard_block``: keep only this rank's experts and dispatch through the above;
  ``owned_expert_state`` and ``unshard_model`` take the pieces apart and put the whole model back together.
* ``load_sharded_model``: the same sharded model straight from an exported HF directory, each rank reading only
  the shared tensors and its own experts (peak host memory per rank: the shared part plus 1/ep_size of the
  new experts, instead of the whole model).
* ``expert_parallel_group``, ``mark_expert_parameters``: the DeepSpeed side (groups; expert gradients reduced
  over the expert-data-parallel group instead of the whole data-parallel group).

Use with DeepSpeed (ZeRO 0-2; ``ep_size`` must divide the world size), on every rank, in this order::

    deepspeed.init_distributed()
    shard_model(model, expert_parallel_group(ep_size))
    set_trainable(model, roles)                      # before marking: the marker depends on it
    mark_expert_parameters(model, ep_size)
    param_groups = split_params_into_different_moe_groups_for_optimizer({"params": trainable, "name": "dense"})
    engine, *_ = deepspeed.initialize(model=model, optimizer=AdamW(param_groups, ...), config=...)

(``split_params_into_different_moe_groups_for_optimizer`` is in ``deepspeed.moe.utils``; ZeRO 1/2 refuse a
client optimizer without its MoE groups, and every rank then needs at least one trainable new expert.)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.accelerator import choose_deepspeed_accelerator

choose_deepspeed_accelerator()  # before the first import of DeepSpeed

from accelerate import init_empty_weights
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from safetensors import safe_open
from torch import nn
from transformers.initialization import no_init_weights

from pipeline.hf_modeling.configuration_layermoe import LayerMoEConfig
from pipeline.hf_modeling.modeling_layermoe import LayerMoEBlock, LayerMoEForCausalLM, moe_blocks, run_expert
from pipeline.hf_modeling.router_kernel import RouteResult
from pipeline.upcycle import is_new_expert_parameter


@dataclass(frozen=True)
class ExpertPlacement:
    """Which rank of an expert-parallel group of ``ep_size`` ranks holds which of a layer's experts: expert 0
    (frozen, replicated) is on every rank, new expert ``e`` (>= 1) on rank ``owners[e - 1]`` only."""

    owners: tuple[int, ...]
    ep_size: int

    def __post_init__(self) -> None:
        if self.ep_size < 1 or any(not 0 <= o < self.ep_size for o in self.owners):
            raise ValueError(f"owners {self.owners} do not fit an expert-parallel group of {self.ep_size} ranks")

    @property
    def num_experts(self) -> int:
        return len(self.owners) + 1

    def owned(self, rank: int) -> tuple[int, ...]:
        """The new experts (ids >= 1) that ``rank`` holds; may be empty."""
        if not 0 <= rank < self.ep_size:
            raise ValueError(f"rank {rank} is not in an expert-parallel group of {self.ep_size}")
        return tuple(e for e, owner in enumerate(self.owners, start=1) if owner == rank)

    def local_experts(self, rank: int) -> tuple[int, ...]:
        """Expert ids present on ``rank``: 0 (replicated) first, then its owned experts in order."""
        return (0, *self.owned(rank))

    def owner(self, expert: int) -> int:
        """The rank that holds new expert ``expert`` (>= 1); expert 0 is on every rank."""
        if not 1 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} has no single owner (new experts are 1..{self.num_experts - 1})")
        return self.owners[expert - 1]


def place_experts(expert_rounds: Sequence[Sequence[int]], ep_size: int) -> list[ExpertPlacement]:
    """Placements for layers whose experts were added in the given rounds (``expert_rounds[layer][e]``, 0 for
    expert 0, as in ``LayerMoEConfig``).

    The new experts are dealt to the ranks like cards, round by round and layer by layer, with one counter
    running through the whole model. So each round's experts (the ones a training stage updates) are spread
    over the ranks as evenly as possible, and so are each layer's experts of one round (ranks differ by at
    most one expert); every rank holds a trainable expert whenever a round adds at least ``ep_size``.
    """
    owners = [[0] * (len(rounds) - 1) for rounds in expert_rounds]
    dealt = 0
    for r in sorted({r for rounds in expert_rounds for r in rounds if r > 0}):
        for layer, rounds in enumerate(expert_rounds):
            for e in (e for e, added in enumerate(rounds) if added == r and e > 0):
                owners[layer][e - 1] = dealt % ep_size
                dealt += 1
    return [ExpertPlacement(tuple(o), ep_size) for o in owners]


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single`` along dim 0; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(rows, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(rows: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup | None) -> torch.Tensor:
    out = rows.new_empty((sum(out_splits), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
    return out


def _exchange(rows: torch.Tensor, out_splits: list[int], in_splits: list[int],
              group: dist.ProcessGroup | None) -> torch.Tensor:
    """Differentiable exchange whose backward runs on every rank whenever grad mode is on.

    Whether ``rows`` requires grad can differ between ranks (e.g. frozen inputs and a rank with nothing to
    compute), and a rank that skipped the backward collective would leave the others waiting, so rows that
    do not require grad become a throw-away leaf that does.
    """
    if torch.is_grad_enabled() and not rows.requires_grad:
        rows = rows.detach().requires_grad_()
    return _AllToAll.apply(rows, out_splits, in_splits, group)


def _run_experts(rows: torch.Tensor, counts: list[int], experts: Mapping[int, nn.Module]) -> torch.Tensor:
    """Rows sorted by expert, ``counts[e]`` of them for expert ``e``: each expert on its contiguous slice."""
    outputs, start = [], 0
    for e, count in enumerate(counts):
        if count:
            outputs.append(run_expert(experts[e], rows[start:start + count]))
            start += count
    return torch.cat(outputs) if outputs else rows  # no outputs: ``rows`` is empty (keeps the autograd graph)


def expert_parallel_forward(x: torch.Tensor, experts: Mapping[int, nn.Module], token_index: torch.Tensor,
                            expert_index: torch.Tensor, weight: torch.Tensor, placement: ExpertPlacement,
                            group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``y[t] = sum over assignments (t, e, w) of w * expert_e(x[t])``, each expert run by the rank holding it.

    ``x``: [N, h] this rank's tokens; ``experts``: this rank's experts by id (``placement.local_experts``);
    the three index tensors: [M] assignments. Every rank of ``group`` must call this (with any number of
    assignments, zero included) in the same order, like any collective.
    """
    world = dist.get_world_size(group) if group is not None or dist.is_initialized() else 1
    if world != placement.ep_size:
        raise ValueError(f"placement is for {placement.ep_size} ranks, the group has {world}")
    rank = dist.get_rank(group) if world > 1 else 0
    num_experts = placement.num_experts
    owners = torch.tensor([rank, *placement.owners], device=x.device)
    dest = owners[expert_index]
    is_local = dest == rank

    # Local assignments (expert 0 and the owned experts), grouped by expert.
    local = torch.nonzero(is_local).squeeze(1)
    local = local[torch.argsort(expert_index[local], stable=True)]
    counts = torch.bincount(expert_index[local], minlength=num_experts).tolist()
    tokens, weights = [token_index[local]], [weight[local]]
    outputs = [_run_experts(x[tokens[0]], counts, experts)]

    if world > 1:
        # Remote assignments grouped by (destination, expert): one contiguous chunk per destination.
        remote = torch.nonzero(~is_local).squeeze(1)
        key = dest[remote] * num_experts + expert_index[remote]
        order = torch.argsort(key, stable=True)
        remote, key = remote[order], key[order]
        send_counts = torch.bincount(key, minlength=world * num_experts)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send_splits = send_counts.view(world, num_experts).sum(1).tolist()
        recv_splits = recv_counts.view(world, num_experts).sum(1).tolist()

        received = _exchange(x[token_index[remote]], recv_splits, send_splits, group)
        # Received rows come by (source, expert): regroup by expert, run the experts, restore the order.
        received_expert = torch.repeat_interleave(
            torch.arange(num_experts, device=x.device).repeat(world), recv_counts)
        by_expert = torch.argsort(received_expert, stable=True)
        counts = recv_counts.view(world, num_experts).sum(0).tolist()
        processed = _run_experts(received[by_expert], counts, experts)[torch.argsort(by_expert)]
        outputs.append(_exchange(processed, send_splits, recv_splits, group))
        tokens.append(token_index[remote])
        weights.append(weight[remote])

    weighted = torch.cat(outputs) * torch.cat(weights).unsqueeze(-1).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, torch.cat(tokens), weighted)


class RemoteExpert(nn.Module):
    """Stands in for an expert held by another rank: no parameters, never called."""

    def __init__(self, expert: int, owner: int):
        super().__init__()
        self.expert, self.owner = expert, owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"expert {self.expert} is held by rank {self.owner} of the expert-parallel group")

    def extra_repr(self) -> str:
        return f"expert={self.expert}, owner={self.owner}"


class ExpertParallelDispatch:
    """A block's ``dispatch(x, routing)`` that runs its experts with expert parallelism."""

    def __init__(self, experts: Mapping[int, nn.Module], placement: ExpertPlacement,
                 group: dist.ProcessGroup | None):
        self.experts, self.placement, self.group = dict(experts), placement, group

    def __call__(self, x: torch.Tensor, routing: RouteResult) -> torch.Tensor:
        k = routing.indices.shape[1]
        slots = routing.indices.reshape(-1)
        active = torch.nonzero(slots < self.placement.num_experts).squeeze(1)  # index E: inactive slot
        return expert_parallel_forward(x, self.experts, active // k, slots[active], routing.weights.reshape(-1)[active],
                                       self.placement, self.group)


def shard_block(block: LayerMoEBlock, placement: ExpertPlacement, group: dist.ProcessGroup | None = None) -> None:
    """Keep only this rank's experts in ``block`` (the others become parameterless ``RemoteExpert``s, so expert
    ids and state-dict keys stay global) and set ``block.dispatch`` to an ``ExpertParallelDispatch``."""
    if placement.num_experts != block.num_experts:
        raise ValueError(f"placement is for {placement.num_experts} experts, the block has {block.num_experts}")
    rank = dist.get_rank(group)
    local = placement.local_experts(rank)
    for e in range(1, block.num_experts):
        if e not in local:
            block.experts[e] = RemoteExpert(e, placement.owner(e))
    block.dispatch = ExpertParallelDispatch({e: block.experts[e] for e in local}, placement, group)


def shard_model(model: nn.Module, group: dist.ProcessGroup) -> dict[int, ExpertPlacement]:
    """Shard every MoE block of a ``LayerMoEForCausalLM`` over ``group`` (placement: ``place_experts`` on the
    model's ``expert_rounds``); returns the placement of each MoE layer."""
    blocks = moe_blocks(model)
    rounds = model.config.expert_rounds
    placements = dict(zip(blocks, place_experts([rounds[i] for i in blocks], dist.get_world_size(group))))
    for i, block in blocks.items():
        shard_block(block, placements[i], group)
    return placements


def load_sharded_model(path: Path, dtype: torch.dtype, device: str,
                       group: dist.ProcessGroup) -> tuple[LayerMoEForCausalLM, dict[int, ExpertPlacement]]:
    """An exported LayerMoE model, already sharded over ``group`` (what ``load_causal_lm`` then ``shard_model``
    give, bit for bit), without ever holding the other ranks' experts: the model is built with its parameters
    on the meta device (buffers such as rotary tables are computed as usual), sharded, and then only the
    tensors it still has are read from the safetensors files, one at a time. In eval mode, like ``load_causal_lm``.

    Every rank of ``group`` calls this. Raises ``ValueError`` when a tensor the model needs is in no file."""
    config = LayerMoEConfig.from_pretrained(str(path))
    with init_empty_weights(), no_init_weights():
        model = LayerMoEForCausalLM(config)
    placements = shard_model(model, group)
    wanted = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in wanted.intersection(f.keys()):
                tensor = f.get_tensor(name)
                state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # tied heads are not in the files: tie them to the loaded embeddings
    missing = sorted(name for name, p in model.state_dict(keep_vars=True).items() if p.is_meta)
    if missing:
        raise ValueError(f"{path}: no weights for {missing[0]} (and {len(missing) - 1} more)")
    return model.to(device).eval(), placements


def owned_expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The new-expert parameters present on this rank, by their (global) state-dict names, as CPU copies."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if is_new_expert_parameter(name)}


def unshard_model(model: nn.Module, expert_state: Mapping[str, torch.Tensor]) -> None:
    """Undo ``shard_model`` in place: every ``RemoteExpert`` becomes a full expert again with its weights from
    ``expert_state`` (state-dict names, e.g. the union of every rank's ``owned_expert_state``), and the blocks
    dispatch locally again."""
    for block_name, block in model.named_modules():
        if not isinstance(block, LayerMoEBlock):
            continue
        for e, expert in enumerate(block.experts):
            if isinstance(expert, RemoteExpert):
                prefix = f"{block_name}.experts.{e}."
                full = copy.deepcopy(block.experts[0])
                weights = {k.removeprefix(prefix): v for k, v in expert_state.items() if k.startswith(prefix)}
                missing = sorted(set(full.state_dict()) - set(weights))
                if missing:
                    raise ValueError(f"no weights for {prefix}{missing[0]} (and {len(missing) - 1} more)")
                full.load_state_dict(weights)
                block.experts[e] = full
        block.__dict__.pop("dispatch", None)  # back to the class's local dispatch
        block._modules.pop("deepspeed_moe_marker", None)


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel and expert-data-parallel groups of one ep size."""
    return f"ep_size_{ep_size}"


def expert_parallel_group(ep_size: int) -> dist.ProcessGroup:
    """This rank's expert-parallel group of ``ep_size`` ranks, created (collectively: every rank must call this)
    with DeepSpeed's groups if needed: expert-parallel groups of consecutive ranks ``[0..P-1], [P..2P-1], ...``,
    expert-data-parallel groups ``[r, r+P, r+2P, ...]`` (same ep rank, so the same experts).

    Needs ``deepspeed.init_distributed()`` first. Pass the result to ``shard_block``, so that the group the
    experts are split over is the one DeepSpeed pairs with the expert-data-parallel groups it reduces over.
    """
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


class DeepSpeedMoEMarker(MoE):
    """A parameterless ``deepspeed.moe.layer.MoE`` that only makes the DeepSpeed engine take its MoE paths.

    The engine reduces MoE-tagged gradients over expert-data-parallel groups only when the model contains an
    ``MoE`` module (``engine.has_moe_layers``); tagged parameters without one fail in ``engine.step`` (ZeRO 0:
    KeyError 'ep_size_N'; ZeRO 1/2: TypeError). ``MoE.__init__`` (gate, experts) is skipped on purpose; the
    engine reads only the attributes set here, and DeepSpeed's per-expert checkpoint files stay empty.
    """

    def __init__(self, num_experts: int, ep_size: int):
        nn.Module.__init__(self)
        self.num_experts, self.ep_size, self.num_local_experts = num_experts, ep_size, 0
        self.expert_group_name = expert_group_name(ep_size)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by ``deepspeed.initialize``: make sure the groups exist."""
        if use_data_before_expert_parallel_:
            raise NotImplementedError("use_data_before_expert_parallel_ is not supported with shard_block")
        expert_parallel_group(self.ep_size)

    def forward(self, *args, **kwargs):
        raise RuntimeError("DeepSpeedMoEMarker only marks a LayerMoEBlock for DeepSpeed; it computes nothing")


def mark_expert_parameters(model: nn.Module, ep_size: int) -> int:
    """Make DeepSpeed treat the new experts (ids >= 1 of every ``LayerMoEBlock``) as expert-parallel.

    Their parameters get ``allreduce = False`` and ``group_name = "ep_size_<ep_size>"`` (DeepSpeed's
    ``is_moe_param``), so they are broadcast and their gradients reduced over the expert-data-parallel group of
    that name instead of the whole data-parallel group; expert 0 (frozen, replicated) stays a dense parameter.
    When some tagged parameter requires grad (call this after choosing what is trainable), every block also
    gets a ``DeepSpeedMoEMarker`` so that the engine uses those groups. Returns the number of tagged tensors.
    """
    blocks = [m for m in model.modules() if isinstance(m, LayerMoEBlock)]
    tagged = [p for block in blocks for expert in list(block.experts)[1:] for p in expert.parameters()]
    for param in tagged:
        param.allreduce = False
        param.group_name = expert_group_name(ep_size)
    if any(p.requires_grad for p in tagged):
        for block in blocks:
            block.deepspeed_moe_marker = DeepSpeedMoEMarker(block.num_experts, ep_size)
    return len(tagged)
