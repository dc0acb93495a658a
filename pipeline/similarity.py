"""Layer-wise language similarity from per-language mean unit vectors, and the similarity.json contract.

Identity used throughout (docs/method.md, 3.1): the mean cosine over all token pairs (u from a, v from b) equals
``mu_a . mu_b`` with ``mu_l`` the mean of the unit-normalised token vectors of language ``l``. So per layer
and language we only keep the sum of unit vectors and a token count.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline.atomic import read_json
from pipeline.errors import LayerMoEError
from pipeline.log import warn

Aggregation = Literal["nn_no_mean", "new_new", "new_old", "all_pairs"]


def pair_key(a: str, b: str) -> str:
    return f"{a}|{b}"


def pairwise_similarities(means: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Every unordered pair of languages (in the mapping's order) -> per-layer ``mu_a . mu_b``.

    ``means[lang]`` is ``[num_layers, hidden]``: the mean unit vector of each layer.
    """
    return {
        pair_key(a, b): (means[a].double() * means[b].double()).sum(-1).tolist()
        for a, b in itertools.combinations(means, 2)
    }


def _mean_over(pairs: dict[str, list[float]], keys: list[str]) -> list[float]:
    rows = [pairs[k] for k in keys]
    return [sum(col) / len(col) for col in zip(*rows)]


def _lookup_key(pairs: dict[str, list[float]], a: str, b: str) -> str:
    for key in (pair_key(a, b), pair_key(b, a)):
        if key in pairs:
            return key
    raise LayerMoEError(f"similarity has no entry for the pair {a}|{b}")


def group_keys(pairs: dict[str, list[float]], old: list[str], new: list[str]) -> tuple[list[str], list[str]]:
    """Keys of the new-new and of the new-old pairs (S_i needs them all: a missing one is an error)."""
    nn = [_lookup_key(pairs, a, b) for a, b in itertools.combinations(new, 2)]
    no = [_lookup_key(pairs, a, b) for a in new for b in old]
    return nn, no


def _old_old_keys(pairs: dict[str, list[float]], old: list[str]) -> list[str] | None:
    """Keys of the old-old pairs, or None when the similarity lacks one (the authors compute none)."""
    try:
        return [_lookup_key(pairs, a, b) for a, b in itertools.combinations(old, 2)]
    except LayerMoEError:
        return None


def group_similarities(pairs: dict[str, list[float]], old: list[str], new: list[str]) -> dict[str, list[float]]:
    """Per-layer means over pair groups: ``new_old``; ``new_new`` (with >= 2 new languages); ``old_old`` (with >= 2
    old languages) and ``all_pairs`` (every pair of old and new languages) only when the old-old pairs are present."""
    nn, no = group_keys(pairs, old, new)
    groups = {"new_old": _mean_over(pairs, no)}
    if nn:
        groups["new_new"] = _mean_over(pairs, nn)
    old_old = _old_old_keys(pairs, old)
    if old_old is not None:
        if old_old:
            groups["old_old"] = _mean_over(pairs, old_old)
        groups["all_pairs"] = _mean_over(pairs, nn + no + old_old)
    return groups


def layer_scores(pairs: dict[str, list[float]], old: list[str], new: list[str], aggregation: Aggregation) -> list[float]:
    """S_i per layer. ``nn_no_mean`` = (NN_i + NO_i) / 2 (the reference); with a single new language there is
    no new-new pair and S_i = NO_i (a warning says so). ``all_pairs`` needs the old-old pairs too."""
    groups = group_similarities(pairs, old, new)
    if aggregation == "nn_no_mean":
        if "new_new" not in groups:
            warn(f"only one new language ({new}): no new-new pairs, so S_i = NO_i (new-old similarity)")
            return groups["new_old"]
        return [(a + b) / 2 for a, b in zip(groups["new_new"], groups["new_old"])]
    if aggregation == "all_pairs" and aggregation not in groups:
        raise LayerMoEError(f"aggregation 'all_pairs' needs every old-old pair of {old} as well; the similarity has "
                            f"only new-new and new-old pairs (use nn_no_mean, new_new or new_old)")
    if aggregation not in groups:
        raise LayerMoEError(f"aggregation {aggregation!r} needs at least two new languages, got {new}")
    return groups[aggregation]


@dataclass
class Similarity:
    """The content of similarity.json."""

    old: list[str]
    new: list[str]
    num_layers: int
    pairs: dict[str, list[float]]
    layer_scores: list[float]
    aggregation: str

    def to_json(self, **extra) -> dict:
        groups = group_similarities(self.pairs, self.old, self.new)
        return {
            "languages": {"old": self.old, "new": self.new},
            "num_layers": self.num_layers,
            "pairs": self.pairs,
            "layer_scores": self.layer_scores,
            "aggregation": self.aggregation,
            "new_new": groups.get("new_new"),
            "new_old": groups["new_old"],
            **extra,
        }


def read_similarity(path: Path) -> Similarity:
    """Read and check similarity.json (every pair has one finite value per layer)."""
    path = Path(path)
    doc = read_json(path, "similarity file", " (run the analyze stage first)")
    try:
        sim = Similarity(old=list(doc["languages"]["old"]), new=list(doc["languages"]["new"]),
                         num_layers=int(doc["num_layers"]), pairs={k: list(map(float, v)) for k, v in doc["pairs"].items()},
                         layer_scores=list(map(float, doc["layer_scores"])), aggregation=str(doc.get("aggregation", "")))
    except (KeyError, TypeError, ValueError) as e:
        raise LayerMoEError(f"{path}: not a valid similarity.json ({type(e).__name__}: {e})") from None
    for key, values in {**sim.pairs, "layer_scores": sim.layer_scores}.items():
        if len(values) != sim.num_layers or not all(math.isfinite(v) for v in values):
            raise LayerMoEError(f"{path}: {key!r} must have {sim.num_layers} finite values, got {values}")
    return sim
