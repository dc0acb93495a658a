"""allocate stage: layer similarity -> experts per layer, and the layers that get a routing classifier.

All counts here are TOTAL experts per layer, including the original (frozen) expert 0; a layer with 1
expert stays dense. Methods (docs/method.md, 3.2):

* ``reference``: ``N_i = ceil(delta * (1/S_i) / sum_j 1/S_j)`` - the authors' formula (the total overshoots delta).
* ``budget``: exactly ``budget`` new experts in all; every layer gets ``min_new_experts`` (default 1; 0 lets
  a layer stay dense, as the reference formula does), the rest is shared in proportion to ``1/S_i`` by largest
  remainder (ties: the less similar layer first, then the lower index).
* ``uniform``: the same count everywhere (the MoE-LPR baseline).
* ``explicit``: a given list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline import log
from pipeline.atomic import read_json, write_json
from pipeline.config import AllocateConfig
from pipeline.errors import LayerMoEError
from pipeline.plots import plot_allocation, words
from pipeline.similarity import layer_scores, read_similarity


@dataclass
class Allocation:
    """The content of allocation.json."""

    experts_per_layer: list[int]
    classifier_layers: list[int]
    method: str
    layer_scores: list[float] | None = None
    delta: float | None = None
    budget: int | None = None

    @property
    def new_experts_per_layer(self) -> list[int]:
        return [n - 1 for n in self.experts_per_layer]

    def to_json(self, **extra) -> dict:
        doc = {
            "experts_per_layer": self.experts_per_layer,
            "new_experts_per_layer": self.new_experts_per_layer,
            "total_new_experts": sum(self.new_experts_per_layer),
            "classifier_layers": self.classifier_layers,
            "method": self.method,
            "layer_scores": self.layer_scores,
        }
        if self.delta is not None:
            doc["delta"] = self.delta
        if self.budget is not None:
            doc["budget"] = self.budget
        return {**doc, **extra}


def read_allocation(path: Path) -> Allocation:
    """Read and check allocation.json."""
    path = Path(path)
    doc = read_json(path, "allocation file", " (run the allocate stage first)")
    try:
        result = Allocation([int(n) for n in doc["experts_per_layer"]], [int(i) for i in doc["classifier_layers"]],
                            str(doc["method"]), doc.get("layer_scores"), doc.get("delta"), doc.get("budget"))
    except (KeyError, TypeError, ValueError) as e:
        raise LayerMoEError(f"{path}: not a valid allocation.json ({type(e).__name__}: {e})") from None
    if not result.experts_per_layer or min(result.experts_per_layer) < 1:
        raise LayerMoEError(f"{path}: experts_per_layer must be a non-empty list of counts >= 1")
    return result


def _check_scores(scores: list[float]) -> None:
    if not scores:
        raise LayerMoEError("no layer similarity scores")
    bad = [(i, s) for i, s in enumerate(scores) if not (s > 0 and math.isfinite(s))]
    if bad:
        raise LayerMoEError(f"layer similarities must be positive and finite for 1/S allocation; "
                            f"bad layers (index, S): {bad}. Try another allocate.aggregation or an explicit list")


def _inverse_weights(scores: list[float]) -> list[float]:
    _check_scores(scores)
    inv = [1.0 / s for s in scores]
    total = sum(inv)
    return [v / total for v in inv]


def reference_allocation(scores: list[float], delta: float) -> list[int]:
    """``N_i = ceil(delta * (1/S_i) / sum_j 1/S_j)``: total experts per layer (incl. the original)."""
    if delta < len(scores):
        raise LayerMoEError(f"allocate.delta = {delta} is smaller than the number of layers ({len(scores)}); "
                            f"every layer keeps its original expert, so delta must be at least {len(scores)}")
    return [math.ceil(delta * w) for w in _inverse_weights(scores)]


def budget_allocation(scores: list[float], budget: int, min_new_experts: int = 1) -> list[int]:
    """Exactly ``budget`` new experts, at least ``min_new_experts`` per layer; the rest by largest remainder of
    ``1/S``. Returns total experts per layer (incl. the original)."""
    layers = len(scores)
    floor = min_new_experts * layers
    if budget < floor:
        raise LayerMoEError(f"allocate.budget = {budget} new experts is smaller than min_new_experts x layers "
                            f"({min_new_experts} x {layers} = {floor}); lower allocate.min_new_experts or raise the budget")
    weights = _inverse_weights(scores)
    rest = budget - floor
    quotas = [rest * w for w in weights]
    extra = [math.floor(q) for q in quotas]
    order = sorted(range(layers), key=lambda i: (-(quotas[i] - extra[i]), scores[i], i))
    for i in order[: rest - sum(extra)]:
        extra[i] += 1
    return [1 + min_new_experts + e for e in extra]


def classifier_layers_by_similarity(scores: list[float], count: int, experts_per_layer: list[int]) -> list[int]:
    """The ``count`` MoE layers (more than one expert) with the highest similarity (ties: lower index first),
    in layer order. A dense layer has nothing to route, so it never gets a classifier."""
    candidates = [i for i in range(len(scores)) if experts_per_layer[i] > 1]
    ranked = sorted(candidates, key=lambda i: (-scores[i], i))
    return sorted(ranked[:count])


def allocate(settings: AllocateConfig, scores: list[float] | None, num_layers: int) -> Allocation:
    """Experts per layer and classifier layers from the settings and the per-layer similarity ``scores``."""
    if scores is not None and len(scores) != num_layers:
        raise LayerMoEError(f"{len(scores)} similarity scores for a model with {num_layers} layers")
    m = settings.method
    if m == "reference":
        experts = reference_allocation(_required_scores(scores, m), settings.delta)
    elif m == "budget":
        experts = budget_allocation(_required_scores(scores, m), settings.budget, settings.min_new_experts)
    elif m == "uniform":
        experts = [settings.experts_per_layer] * num_layers
    else:
        experts = list(settings.explicit)
        if len(experts) != num_layers:
            raise LayerMoEError(f"allocate.explicit has {len(experts)} entries but the model has {num_layers} layers")
    if settings.classifier_layers is not None:
        bad = [i for i in settings.classifier_layers if not 0 <= i < num_layers]
        if bad:
            raise LayerMoEError(f"allocate.classifier_layers {bad} are outside layers 0..{num_layers - 1}")
        dense = [i for i in settings.classifier_layers if experts[i] == 1]
        if dense:
            raise LayerMoEError(f"allocate.classifier_layers {dense} are dense (1 expert): a classifier needs new experts")
        classifiers = sorted(set(settings.classifier_layers))
    elif settings.classifier_count == 0:
        classifiers = []
    else:
        classifiers = classifier_layers_by_similarity(_required_scores(scores, "classifier_count"),
                                                      settings.classifier_count, experts)
    return Allocation(experts, classifiers, m, layer_scores=scores,
                      delta=settings.delta if m == "reference" else None,
                      budget=settings.budget if m == "budget" else None)


def _required_scores(scores: list[float] | None, what: str) -> list[float]:
    if scores is None:
        raise LayerMoEError(f"allocate method {what!r} needs similarity scores (run analyze first)")
    return scores


def write_allocation(out: Path, result: Allocation, settings: AllocateConfig, title: str,
                     earlier: list[list[int]], round_names: list[str], **extra) -> None:
    """allocation.json and allocation.png of ``result`` into the directory ``out``. ``earlier``: per layer, the
    round number that added each expert the model already has (0: the original FFN); ``round_names``: the names of
    the rounds so far, this one last."""
    write_json(out / "allocation.json", result.to_json(aggregation=settings.aggregation, **extra))
    experts = [list(rounds) + [len(round_names)] * new for rounds, new in zip(earlier, result.new_experts_per_layer)]
    plot_allocation(experts, round_names, result.classifier_layers,
                    f"{title}: {sum(result.new_experts_per_layer)} new experts, {sum(map(len, experts))} in all "
                    f"({result.method} allocation)", out / "allocation.png")


def allocate_from_similarity_file(similarity_file: Path, settings: AllocateConfig, out: Path) -> Allocation:
    """``layermoe allocate --similarity FILE``: the allocation of any similarity.json (one written by the analyze
    stage, or one built from published pair values) into ``out``, without a run directory. The file needs the
    new-new and new-old pairs that S_i uses; old-old pairs only for ``aggregation: all_pairs``."""
    sim = read_similarity(similarity_file)
    scores = layer_scores(sim.pairs, sim.old, sim.new, settings.aggregation)
    result = allocate(settings, scores, sim.num_layers)
    out.mkdir(parents=True, exist_ok=True)
    write_allocation(out, result, settings, f"new {words(sim.new)} vs old {words(sim.old)}", [[0]] * sim.num_layers,
                     ["this allocation"], similarity=str(similarity_file))
    log.info(f"allocate: {result.method} -> experts per layer {result.experts_per_layer} "
             f"({sum(result.experts_per_layer)} in total, {sum(result.new_experts_per_layer)} new), classifier layers "
             f"{result.classifier_layers}; written to {out / 'allocation.json'}")
    return result
