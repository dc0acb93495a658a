"""Routing statistics accumulated over many forwards, reported per layer.

Per MoE layer: expert load (assigned slots per expert; max/mean, 1.0 = balanced whatever E is), dead experts
(no assignment in the interval), the share of original-language tokens whose effective top-1 is expert 0
(the classifier sending a token to expert 0 counts as top-1 = 0), and classifier accuracy where there is one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from pipeline import distributed
from pipeline.hf_modeling.modeling_layermoe import OLD, RoutingRecord


@dataclass
class LayerCounts:
    load: torch.Tensor  # [E] assigned slots
    original_tokens: int = 0
    original_top1_is_0: int = 0
    classified: int = 0
    classified_correct: int = 0


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer's routing statistics over an interval."""

    experts: int
    load: list[int]  # assigned slots per expert (the classifier's expert-0 assignments included)
    load_max_over_mean: float | None  # 1.0 = balanced whatever the expert count; None: no slot assigned
    dead_experts: int  # experts with no assignment
    original_top1_expert0: float | None  # share of original-language tokens whose effective top-1 is expert 0
    classifier_accuracy: float | None  # None: the layer has no classifier


@dataclass
class RoutingStats:
    layers: dict[int, LayerCounts] = field(default_factory=dict)

    def add(self, records: dict[int, RoutingRecord], original: torch.Tensor) -> None:
        """Accumulate one forward's records; ``original`` is the flat [N] bool original-language mask."""
        for i, r in records.items():
            num_experts = r.router_logits.shape[-1]
            counts = self.layers.setdefault(i, LayerCounts(torch.zeros(num_experts, dtype=torch.long)))
            valid = r.valid
            top1 = r.expert_indices[:, 0].clone()
            routed = valid.clone()
            if r.sent_to_original is not None:
                top1[r.sent_to_original] = 0
                routed &= ~r.sent_to_original
                counts.load[0] += int((valid & r.sent_to_original).sum())
                predicted_old = r.classifier_logits.argmax(-1) == OLD
                counts.classified += int(valid.sum())
                counts.classified_correct += int((predicted_old == original)[valid].sum())
            counts.load += torch.bincount(r.expert_indices[routed].reshape(-1).cpu(), minlength=num_experts)
            mask = valid & original
            counts.original_tokens += int(mask.sum())
            counts.original_top1_is_0 += int((top1[mask] == 0).sum())

    def all_reduce(self, layers: dict[int, int], device: torch.device) -> None:
        """Sum every rank's counts (a collective: every rank calls it with the same ``layers``, MoE layer index ->
        expert count, also a rank that saw no token); ``device``: where the collective runs (the model's device)."""
        counts = [self.layers.setdefault(i, LayerCounts(torch.zeros(experts, dtype=torch.long)))
                  for i, experts in sorted(layers.items())]
        flat = torch.cat([torch.cat([c.load, torch.tensor([c.original_tokens, c.original_top1_is_0, c.classified,
                                                            c.classified_correct])]) for c in counts]).to(device)
        flat = distributed.all_reduce_sum(flat).cpu()
        for c in counts:
            n = len(c.load)
            c.load, rest, flat = flat[:n].clone(), flat[n:n + 4].tolist(), flat[n + 4:]
            c.original_tokens, c.original_top1_is_0, c.classified, c.classified_correct = rest

    def summary(self) -> dict[int, LayerRouting]:
        """Each MoE layer's statistics since this object was made, by layer index."""
        out = {}
        for i, c in sorted(self.layers.items()):
            load = c.load.float()
            out[i] = LayerRouting(
                experts=len(c.load),
                load=c.load.tolist(),
                load_max_over_mean=float(load.max() / load.mean()) if load.sum() > 0 else None,
                dead_experts=int((c.load == 0).sum()),
                original_top1_expert0=c.original_top1_is_0 / c.original_tokens if c.original_tokens else None,
                classifier_accuracy=c.classified_correct / c.classified if c.classified else None,
            )
        return out

    def overview(self) -> RoutingOverview | None:
        """Averages over the MoE layers (None without any MoE layer)."""
        layers = self.summary().values()
        if not layers:
            return None

        def mean(values: list[float | None]) -> float | None:
            present = [v for v in values if v is not None]
            return sum(present) / len(present) if present else None

        return RoutingOverview(mean([v.load_max_over_mean for v in layers]), sum(v.dead_experts for v in layers),
                               mean([v.original_top1_expert0 for v in layers]),
                               mean([v.classifier_accuracy for v in layers]))

    def one_line(self) -> str:
        """A compact overview: mean load imbalance, dead experts, expert-0 share, classifier accuracy."""
        o = self.overview()
        if o is None:
            return "no MoE layers"
        parts = [f"load max/mean {o.load_max_over_mean or 0:.2f}", f"dead experts {o.dead_experts}"]
        if o.original_top1_expert0 is not None:
            parts.append(f"orig->expert0 {o.original_top1_expert0:.1%}")
        if o.classifier_accuracy is not None:
            parts.append(f"classifier acc {o.classifier_accuracy:.1%}")
        return ", ".join(parts)


@dataclass(frozen=True)
class RoutingOverview:
    """A routing interval in four numbers, averaged over the MoE layers (metrics.jsonl, TensorBoard, the log)."""

    load_max_over_mean: float | None
    dead_experts: int
    original_top1_expert0: float | None
    classifier_accuracy: float | None


def routing_to_json(layers: dict[int, LayerRouting]) -> dict[str, dict]:
    """Per-layer statistics as JSON (routing_stats.json, report.json): ``{"<layer>": {field: value}}``."""
    return {str(i): dataclasses.asdict(v) for i, v in layers.items()}


def routing_from_json(doc: dict) -> dict[int, LayerRouting]:
    """The inverse of :func:`routing_to_json` (raises KeyError/TypeError/ValueError on a malformed document)."""
    return {int(i): LayerRouting(**v) for i, v in doc.items()}
