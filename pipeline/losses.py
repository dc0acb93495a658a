"""Training losses of the two stages (docs/method.md, 2 and 3.3), computed from the blocks' routing records.

Shapes: every routing record is over the flattened ``batch * seq`` tokens of one forward; ``language_ids`` is
``[batch, seq]`` with indices into the run's language list.

* load balance, per MoE layer with its own E_i: ``E_i * sum_e f_e * P_e``; f_e = share of routed slots that chose
  e, P_e = mean router probability of e, over valid tokens the classifier did not send to expert 0. It equals 1
  when routing is uniform whatever E_i is, so layers are comparable; the loss is the mean over MoE layers.
  (The public MoE-LPR code's variant is k times this.)
* LPR (language prior): over original-language tokens, ``-log p_0`` (paper, default) or the reference's
  cross-entropy applied to probabilities (``double_softmax``); mean over those tokens and over MoE layers.
* classifier: cross-entropy of the classifier logits against old (= original language) / new, mean over the
  valid tokens of every classifier layer.

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

from pipeline.config import TrainingStage
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


def load_balance(record: RoutingRecord) -> torch.Tensor:
    """``E * sum_e f_e P_e`` for one layer (1.0 for uniform routing)."""
    probs = torch.softmax(record.router_logits.float(), dim=-1)
    routed = record.valid if record.sent_to_original is None else record.valid & ~record.sent_to_original
    num_experts = probs.shape[-1]
    if not routed.any():
        return probs.new_zeros(())
    slots = F.one_hot(record.expert_indices[routed], num_experts).float().sum(dim=1)  # [n, E]
    f = slots.sum(0) / slots.sum()
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


def classifier_loss(record: RoutingRecord, original: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the old/new classifier (label OLD for original-language tokens) over valid tokens."""
    labels = torch.where(original, OLD, NEW)[record.valid]
    return F.cross_entropy(record.classifier_logits[record.valid].float(), labels)


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
               records: dict[int, RoutingRecord], original: torch.Tensor, alpha: float = 0.01, gamma: float = 0.1,
               beta: float = 0.1, lpr_form: str = "paper") -> LossParts:
    """Stage 1: CE + alpha * balance. Stage 2: CE + gamma * LPR + beta * classifier CE.

    ``logits``: full logits or :class:`HiddenStates` (chunked CE); ``original`` is ``[batch, seq]`` bool: the token
    belongs to an original (base-model) language."""
    ce = next_token_loss(logits, input_ids)
    flat_original = original.reshape(-1)
    if training_stage == 1:
        balance = torch.stack([load_balance(r) for r in records.values()]).mean() if records else ce.new_zeros(())
        return LossParts(ce + alpha * balance, ce, balance=balance)
    lpr_value = torch.stack([lpr(r, flat_original, lpr_form) for r in records.values()]).mean() if records else ce.new_zeros(())
    gated = [r for r in records.values() if r.classifier_logits is not None]
    cls = torch.stack([classifier_loss(r, flat_original) for r in gated]).mean() if gated else ce.new_zeros(())
    return LossParts(ce + gamma * lpr_value + beta * cls, ce, lpr=lpr_value, classifier=cls)
