"""Training losses of the two stages (docs/method.md, 2 and 3.3), computed from the blocks' routing records.

Shapes: every routing record is over the flattened ``batch * seq`` tokens of one forward; ``original`` and
``language_ids`` are ``[batch, seq]``. The forms and reductions the authors' code uses are options
(``train.balance_form``, ``train.lpr_form``, ``train.lpr_reduction``, ``train.classifier_label``; the preset
``recipe: reference`` selects them all):

* load balance, per MoE layer with its own E_i and k_i, over valid tokens the classifier did not send to expert 0;
  f_{j,e} = share of those tokens whose j-th choice is e, P_e = mean router probability of e:
  ``reference``: ``E_i * sum_j sum_e f_{j,e} P_e`` (the authors' per-slot sum; k_i for uniform routing);
  ``normalized``: the same divided by k_i (1.0 for uniform routing whatever E_i and k_i are).
  The loss is the mean over MoE layers.
* LPR (language prior): over original-language tokens, ``-log p_0`` (``paper``) or the authors' cross-entropy
  applied to probabilities (``double_softmax``); mean over those tokens, then over MoE layers (``layers``) or
  within groups of layers with the same E_i and then over the groups (``expert_groups``).
* classifier: cross-entropy of the classifier logits against old (= original language) / new, mean over the
  classifier layers of: the mean over valid tokens, each with its own label (``token``), or the mean over
  sequences of the mean over the sequence's valid tokens, all labelled by the sequence's first valid token
  (``sequence``).

The next-token cross-entropy takes either full logits or :class:`HiddenStates` (the decoder's output and the
LM head): then the head is applied ``chunk_tokens`` positions at a time, each chunk recomputed in the backward
(``torch.utils.checkpoint``), so the fp32 logits of a whole micro-batch (``batch x seq x vocab``: 2.5 GB for
Qwen1.5's 151,936-token vocabulary at 4 x 1024 tokens) never exist at once. Same loss and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.config import TrainConfig, TrainingStage
from pipeline.hf_modeling.modeling_layermoe import NEW, OLD, RoutingRecord


@dataclass
class HiddenStates:
    """The decoder's last hidden states ``[batch, seq, h]`` and the function that turns rows of them into logits
    (``[n, h] -> [n, vocab]``, e.g. ``output_logits``): the cross-entropy is then computed ``chunk_tokens``
    positions at a time (0: all at once)."""

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]
    chunk_tokens: int = 1024


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of fp32 cross-entropies of logits ``[n, vocab]`` against ``targets [n]`` where ``mask [n]`` is true."""
    return (F.cross_entropy(logits.float(), targets, reduction="none") * mask).sum()


def _chunk_cross_entropy_sum(head: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, targets: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    return _cross_entropy_sum(head(rows), targets, mask)


def next_token_loss_sum(prediction: torch.Tensor | HiddenStates, input_ids: torch.Tensor,
                        valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the next-token cross-entropies (fp32) over positions whose target is valid, and their number.

    ``prediction``: logits ``[batch, seq, vocab]``, or :class:`HiddenStates` (chunked, see the module docstring)."""
    targets = input_ids[:, 1:].reshape(-1)
    mask = (torch.ones_like(targets, dtype=torch.bool) if valid is None else valid[:, 1:].reshape(-1).bool())
    if not isinstance(prediction, HiddenStates):
        return _cross_entropy_sum(prediction[:, :-1].reshape(len(targets), -1), targets, mask), mask.sum()
    rows = prediction.hidden[:, :-1].reshape(len(targets), -1)
    step = prediction.chunk_tokens or max(len(targets), 1)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), step):
        chunk = (prediction.head, rows[start:start + step], targets[start:start + step], mask[start:start + step])
        if torch.is_grad_enabled():  # keep only the chunk's input; its logits are recomputed in the backward
            total = total + checkpoint(_chunk_cross_entropy_sum, *chunk, use_reentrant=False)
        else:
            total = total + _chunk_cross_entropy_sum(*chunk)
    return total, mask.sum()


def next_token_loss(prediction: torch.Tensor | HiddenStates, input_ids: torch.Tensor,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over positions whose target is valid; ``prediction`` is logits or
    :class:`HiddenStates`."""
    total, count = next_token_loss_sum(prediction, input_ids, valid)
    return total / count.clamp(min=1)


def load_balance(record: RoutingRecord, form: str = "reference") -> torch.Tensor:
    """``E * sum_j sum_e f_{j,e} P_e`` of one layer (``reference``: k for uniform routing), or that divided by k
    (``normalized``: 1.0 for uniform routing)."""
    if form not in ("reference", "normalized"):
        raise ValueError(f"unknown balance form {form!r}")
    probs = torch.softmax(record.router_logits.float(), dim=-1)
    routed = record.valid if record.sent_to_original is None else record.valid & ~record.sent_to_original
    num_experts, k = probs.shape[-1], record.expert_indices.shape[-1]
    if not routed.any():
        return probs.new_zeros(())
    choices = F.one_hot(record.expert_indices[routed], num_experts).float()  # [n, k, E]
    f = choices.sum(dim=(0, 1)) / choices.shape[0]  # sum over slots j of f_{j,e}
    if form == "normalized":
        f = f / k
    p = probs[routed].mean(0)
    return num_experts * (f * p).sum()


def lpr(record: RoutingRecord, original: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """Language-prior loss of one layer over tokens where ``original`` ([N] bool) is true."""
    mask = original & record.valid
    if not mask.any():
        return record.router_logits.new_zeros(())
    logits = record.router_logits[mask].float()
    if form == "paper":
        return -torch.log_softmax(logits, dim=-1)[:, 0].mean()
    if form == "double_softmax":
        probs = torch.softmax(logits, dim=-1)
        return F.cross_entropy(probs, torch.zeros(len(probs), dtype=torch.long, device=probs.device))
    raise ValueError(f"unknown LPR form {form!r}")


def reduce_layers(values: dict[int, torch.Tensor], experts: dict[int, int], reduction: str = "layers") -> torch.Tensor:
    """Combine per-layer losses: the mean over layers (``layers``), or the mean within each group of layers with
    the same expert count ``experts[i]`` and then the mean over the groups (``expert_groups``)."""
    if reduction == "layers":
        return torch.stack(list(values.values())).mean()
    if reduction == "expert_groups":
        groups: dict[int, list[torch.Tensor]] = {}
        for i, value in values.items():
            groups.setdefault(experts[i], []).append(value)
        return torch.stack([torch.stack(group).mean() for group in groups.values()]).mean()
    raise ValueError(f"unknown LPR reduction {reduction!r}")


def classifier_loss(record: RoutingRecord, original: torch.Tensor, label: str = "token") -> torch.Tensor:
    """Cross-entropy of the old/new classifier of one layer; ``original`` is ``[batch, seq]`` bool (label OLD for
    original-language tokens). ``token``: mean over valid tokens; ``sequence``: every token labelled by its
    sequence's first valid token, mean over each sequence's valid tokens, then over sequences."""
    valid = record.valid.reshape(original.shape)
    logits = record.classifier_logits.float().reshape(*original.shape, -1)
    if label == "token":
        return F.cross_entropy(logits[valid], torch.where(original, OLD, NEW)[valid])
    if label != "sequence":
        raise ValueError(f"unknown classifier label {label!r}")
    has_tokens = valid.any(dim=1)
    first = valid.int().argmax(dim=1)  # index of the first valid token
    labels = torch.where(original.gather(1, first.unsqueeze(1)), OLD, NEW).expand_as(original)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    per_token = per_token.reshape(original.shape) * valid
    per_sequence = per_token.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
    return per_sequence[has_tokens].mean()


@dataclass
class LossParts:
    """Every loss term, unscaled, plus the total that is optimised."""

    total: torch.Tensor
    ce: torch.Tensor
    balance: torch.Tensor | None = None
    lpr: torch.Tensor | None = None
    classifier: torch.Tensor | None = None

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items() if v is not None}


def stage_loss(training_stage: TrainingStage, logits: torch.Tensor | HiddenStates, input_ids: torch.Tensor,
               records: dict[int, RoutingRecord], original: torch.Tensor, train: TrainConfig) -> LossParts:
    """Stage 1: CE + alpha * balance. Stage 2: CE + gamma * LPR + beta * classifier CE. A dense model (no
    routing records) trains on CE alone in both stages.

    ``logits``: full logits or :class:`HiddenStates` (chunked CE); ``original`` is ``[batch, seq]`` bool: the token
    belongs to an original (base-model) language; the forms and weights come from ``train`` (``TrainConfig``)."""
    ce = next_token_loss(logits, input_ids)
    if not records:
        return LossParts(ce, ce)
    if training_stage == 1:
        balance = torch.stack([load_balance(r, train.balance_form) for r in records.values()]).mean()
        return LossParts(ce + train.alpha * balance, ce, balance=balance)
    flat_original = original.reshape(-1)
    experts = {i: r.router_logits.shape[-1] for i, r in records.items()}
    lpr_value = reduce_layers({i: lpr(r, flat_original, train.lpr_form) for i, r in records.items()}, experts,
                              train.lpr_reduction)
    gated = [r for r in records.values() if r.classifier_logits is not None]
    cls = (torch.stack([classifier_loss(r, original, train.classifier_label) for r in gated]).mean() if gated
           else ce.new_zeros(()))
    return LossParts(ce + train.gamma * lpr_value + train.beta * cls, ce, lpr=lpr_value, classifier=cls)
