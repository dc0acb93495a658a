"""Upcycling a dense model into a LayerMoE model, growing it for a further round, and parameter roles.

* ``upcycle``: every layer with ``N_i > 1`` experts gets a ``LayerMoEBlock`` whose expert 0 is the original
  FFN and whose other experts are exact copies of it; routers (and classifiers) are freshly initialised.
  Right after upcycling the model computes the dense model's function.
* Both leave the classifiers inactive (``config.classifiers_active = False``): in stage 1 every layer routes
  top-k over all its experts, so the new experts of classifier layers are trained too; stage 2 activates them.
* ``grow``: appends ``N_i(new) - 1`` fresh copies of the ORIGINAL FFN (expert 0) per layer after the existing
  experts; routers are re-initialised (reference) or keep their old rows; classifier layers may change.
* ``parameter_roles`` / ``set_trainable``: which parameters are the original model, the new experts of each
  round, routers, classifiers, so the training stages can freeze exactly what the method says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers.initialization import no_init_weights

from pipeline.errors import LayerMoEError
from pipeline.hf_modeling.configuration_layermoe import LayerMoEConfig
from pipeline.hf_modeling.modeling_layermoe import LayerMoEBlock, LayerMoEForCausalLM, moe_blocks

_MLP_KEY = re.compile(r"^(model\.layers\.(\d+)\.mlp\.)(?:experts\.(\d+)\.)?(.+)$")


@dataclass(frozen=True)
class ExpansionRound:
    """One round's expansion plan: total experts per layer for the round, classifier layers, languages."""

    name: str
    languages: list[str]
    experts_per_layer: list[int]  # N_i of this round's allocation (incl. the original expert)
    classifier_layers: list[int]


def _check_plan(plan: ExpansionRound, num_layers: int, top_k: int) -> None:
    if len(plan.experts_per_layer) != num_layers:
        raise LayerMoEError(f"allocation has {len(plan.experts_per_layer)} layers but the model has {num_layers}")
    if any(n < 1 for n in plan.experts_per_layer):
        raise LayerMoEError(f"every layer needs >= 1 expert, got {plan.experts_per_layer}")
    bad = [i for i in plan.classifier_layers if not 0 <= i < num_layers]
    if bad:
        raise LayerMoEError(f"classifier layers {bad} are outside layers 0..{num_layers - 1}")
    if top_k < 1:
        raise LayerMoEError(f"top_k must be >= 1, got {top_k}")


def _build(config: LayerMoEConfig, state: dict[str, torch.Tensor], seed: int,
           kept_router_rows: dict[int, torch.Tensor] | None = None) -> LayerMoEForCausalLM:
    """Construct the model without random init, take the tensors of ``state`` (base-model keys) as its parameters
    (no copy), initialise routers/classifiers that ``state`` lacks (seeded), and check nothing else is missing."""
    with no_init_weights():
        model = LayerMoEForCausalLM(config)
    missing, unexpected = model.base.load_state_dict(state, strict=False, assign=True)
    fresh = {k for k in missing if ".mlp.router." in k or ".mlp.classifier." in k}
    others = sorted(set(missing) - fresh)
    if others or unexpected:
        raise LayerMoEError(f"cannot build the expanded model: missing {others[:5]}, unexpected {sorted(unexpected)[:5]}")
    generator = torch.Generator().manual_seed(seed)
    for i, block in moe_blocks(model).items():
        for name in ("router", "classifier"):
            linear = getattr(block, name)
            if linear is not None and f"model.layers.{i}.mlp.{name}.weight" in fresh:
                weight = torch.empty(linear.weight.shape, dtype=torch.float32)
                torch.nn.init.xavier_normal_(weight, generator=generator)
                if name == "router" and kept_router_rows and i in kept_router_rows:
                    rows = kept_router_rows[i]
                    weight[: rows.shape[0]] = rows
                with torch.no_grad():
                    linear.weight.copy_(weight)
    model.tie_weights()
    return model.eval()


def upcycle(dense: torch.nn.Module, plan: ExpansionRound, original_languages: list[str], top_k: int = 2,
            pooling: str = "prefix", seed: int = 0) -> LayerMoEForCausalLM:
    """The LayerMoE model for a dense causal LM and the first round's plan.

    Expert 0 of every MoE layer takes the dense FFN's own tensors (not copies); ``dense`` must not be trained
    afterwards as if it were separate."""
    if isinstance(dense, LayerMoEForCausalLM):
        raise LayerMoEError("the model is already expanded: use grow() for a further round")
    layers = dense.model.layers
    _check_plan(plan, len(layers), top_k)
    config = LayerMoEConfig(
        base_config=dense.config.to_dict(), experts_per_layer=list(plan.experts_per_layer),
        expert_rounds=[[0] + [1] * (n - 1) for n in plan.experts_per_layer],
        classifier_layers=[i for i in plan.classifier_layers if plan.experts_per_layer[i] > 1],
        num_experts_per_tok=top_k, pooling=pooling, rounds=[{"name": plan.name, "languages": list(plan.languages)}],
        original_languages=list(original_languages), classifiers_active=False)
    state = {}
    for key, tensor in dense.state_dict().items():
        m = _MLP_KEY.match(key)
        if m and plan.experts_per_layer[int(m.group(2))] > 1:
            for e in range(plan.experts_per_layer[int(m.group(2))]):
                state[f"{m.group(1)}experts.{e}.{m.group(4)}"] = tensor if e == 0 else tensor.clone()
        else:
            state[key] = tensor
    return _build(config, state, seed)


def grow(model: LayerMoEForCausalLM, plan: ExpansionRound, keep_router_rows: bool = False,
         seed: int = 0) -> LayerMoEForCausalLM:
    """A new model for a further round: ``N_i - 1`` fresh copies of expert 0 appended in each layer.

    ``model`` is not modified (the new model's tensors are copies or new)."""
    config = model.config
    old_experts = list(config.experts_per_layer)
    _check_plan(plan, len(old_experts), config.num_experts_per_tok)
    round_index = len(config.rounds) + 1
    new_experts = [old + n - 1 for old, n in zip(old_experts, plan.experts_per_layer)]
    expert_rounds = [list(r) + [round_index] * (n - 1) for r, n in zip(config.expert_rounds, plan.experts_per_layer)]
    classifiers = [i for i in plan.classifier_layers if new_experts[i] > 1]
    new_config = LayerMoEConfig(
        base_config=config.base_config, experts_per_layer=new_experts, expert_rounds=expert_rounds,
        classifier_layers=classifiers, num_experts_per_tok=config.num_experts_per_tok, pooling=config.pooling,
        rounds=config.rounds + [{"name": plan.name, "languages": list(plan.languages)}],
        original_languages=config.original_languages, classifiers_active=False)
    state, kept_rows = {}, {}
    for key, tensor in model.base.state_dict().items():
        m = _MLP_KEY.match(key)
        if not m:
            state[key] = tensor.clone()
            continue
        prefix, layer, expert, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if rest == "router.weight":
            if keep_router_rows:
                kept_rows[layer] = tensor.detach().float().clone()
            continue  # re-initialised (its shape changes)
        if rest == "classifier.weight":
            if layer in classifiers:
                state[key] = tensor.clone()
            continue
        if new_experts[layer] == 1:  # still dense
            state[key] = tensor.clone()
            continue
        if expert is None:  # a dense layer becomes MoE: the original FFN is expert 0
            expert = "0"
        state[f"{prefix}experts.{expert}.{rest}"] = tensor.clone()
        if expert == "0":
            for e in range(old_experts[layer], new_experts[layer]):
                state[f"{prefix}experts.{e}.{rest}"] = tensor.clone()
    return _build(new_config, state, seed, kept_rows)


ROLES = ("original", "routers", "classifiers")  # plus "experts_round<r>" for every round r >= 1


def parameter_roles(model: LayerMoEForCausalLM) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Parameters by role: ``original`` (everything of the dense model, expert 0 included), ``experts_round<r>``
    (experts added in round r), ``routers``, ``classifiers``. Tied parameters appear once."""
    roles: dict[str, list] = {role: [] for role in ROLES}
    rounds = model.config.expert_rounds
    for r in sorted({r for layer in rounds for r in layer if r > 0}):
        roles[f"experts_round{r}"] = []
    for name, param in model.named_parameters():
        m = _MLP_KEY.match(name.removeprefix("base."))
        if m and m.group(4).startswith("router."):
            roles["routers"].append((name, param))
        elif m and m.group(4).startswith("classifier."):
            roles["classifiers"].append((name, param))
        elif m and m.group(3) is not None and rounds[int(m.group(2))][int(m.group(3))] > 0:
            roles[f"experts_round{rounds[int(m.group(2))][int(m.group(3))]}"].append((name, param))
        else:
            roles["original"].append((name, param))
    return roles


def is_new_expert_parameter(name: str) -> bool:
    """Whether a parameter name of a LayerMoE model (``base.`` prefix optional) is a new expert's (id >= 1)."""
    m = _MLP_KEY.match(name.removeprefix("base."))
    return m is not None and m.group(3) is not None and int(m.group(3)) > 0


def set_trainable(model: LayerMoEForCausalLM, trainable_roles: list[str]) -> list[str]:
    """Freeze everything except the given roles; returns the names of the trainable parameters."""
    roles = parameter_roles(model)
    unknown = sorted(set(trainable_roles) - set(roles))
    if unknown:
        raise LayerMoEError(f"unknown parameter roles {unknown}; this model has {sorted(roles)}")
    names = []
    for role, params in roles.items():
        for name, param in params:
            param.requires_grad_(role in trainable_roles)
            if role in trainable_roles:
                names.append(name)
    return names


def is_moe_block(module: torch.nn.Module) -> bool:
    return isinstance(module, LayerMoEBlock)
