"""Allocation formulas: the paper's Llama-3.2-3B list (also from the authors' published pair values through
`layermoe allocate --similarity`), exact budgets, classifier layers, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipeline.allocate import allocate, budget_allocation, classifier_layers_by_similarity, reference_allocation
from pipeline.cli import main
from pipeline.config import AllocateConfig
from pipeline.errors import LayerMoEError
from pipeline.similarity import group_similarities, layer_scores

LLAMA_3B_S = [0.0359, 0.0402, 0.0352, 0.0503, 0.0636, 0.0698, 0.0842, 0.0960, 0.0945, 0.0978, 0.1060, 0.1094,
              0.1164, 0.1074, 0.1152, 0.1109, 0.0973, 0.0907, 0.0830, 0.0835, 0.0778, 0.0683, 0.0685, 0.0548,
              0.0498, 0.0497, 0.0481, 0.0453]
LLAMA_3B_N = [5, 5, 5, 4, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4]


def test_reference_reproduces_llama_3b_list():
    experts = reference_allocation(LLAMA_3B_S, delta=70)
    assert experts == LLAMA_3B_N
    assert sum(experts) == 84 and sum(n - 1 for n in experts) == 56


def test_reference_through_allocate_keeps_contract_fields():
    result = allocate(AllocateConfig(method="reference", delta=70, classifier_count=7), LLAMA_3B_S, 28)
    doc = result.to_json()
    assert doc["experts_per_layer"] == LLAMA_3B_N
    assert doc["new_experts_per_layer"] == [n - 1 for n in LLAMA_3B_N]
    assert doc["method"] == "reference" and doc["delta"] == 70
    # the 7 most similar layers of the list above
    assert doc["classifier_layers"] == sorted(sorted(range(28), key=lambda i: -LLAMA_3B_S[i])[:7])


@pytest.mark.parametrize("seed", range(20))
def test_budget_is_exact_with_the_floor_of_new_experts_per_layer(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 40)
    floor = seed % 3  # 0: a layer may stay dense
    scores = [rng.uniform(0.01, 0.5) for _ in range(layers)]
    budget = rng.randint(max(floor * layers, 1), 6 * layers)
    experts = budget_allocation(scores, budget, floor)
    assert sum(n - 1 for n in experts) == budget
    assert min(experts) >= 1 + floor
    # less similar layers never get fewer experts than more similar ones
    order = sorted(range(layers), key=lambda i: scores[i])
    assert all(experts[a] >= experts[b] for a, b in zip(order, order[1:]))


def test_budget_matches_proportions_when_they_divide_evenly():
    # 1/S = 4, 2, 2 -> rest 8 shared 4:2:2
    assert budget_allocation([0.25, 0.5, 0.5], 11) == [1 + 1 + 4, 1 + 1 + 2, 1 + 1 + 2]
    # without a floor: 4 new experts shared 2:1:1; 2 shared 1:0.5:0.5 -> the tie of remainders goes to the lower index
    assert budget_allocation([0.25, 0.5, 0.5], 4, 0) == [3, 2, 2]
    assert budget_allocation([0.25, 0.5, 0.5], 2, 0) == [2, 2, 1]


def test_uniform_and_explicit():
    assert allocate(AllocateConfig(method="uniform", experts_per_layer=6, classifier_count=0), None, 24).experts_per_layer == [6] * 24
    result = allocate(AllocateConfig(method="explicit", explicit=[2, 3, 1], classifier_layers=[1, 0]), None, 3)
    assert result.experts_per_layer == [2, 3, 1] and result.new_experts_per_layer == [1, 2, 0]
    assert result.classifier_layers == [0, 1]


def test_classifier_layers_are_the_most_similar_moe_layers():
    assert classifier_layers_by_similarity([0.1, 0.5, 0.3, 0.5, 0.2], 3, [2] * 5) == [1, 2, 3]
    assert classifier_layers_by_similarity([0.1, 0.2], 5, [2, 2]) == [0, 1]
    assert classifier_layers_by_similarity([0.1, 0.5, 0.3, 0.5, 0.2], 3, [2, 1, 2, 2, 2]) == [2, 3, 4]


@pytest.mark.parametrize("settings, scores, layers, message", [
    (AllocateConfig(method="reference", delta=10), [0.1] * 28, 28, "smaller than the number of layers"),
    (AllocateConfig(method="budget", budget=5), [0.1] * 6, 6, "smaller than min_new_experts x layers"),
    (AllocateConfig(method="reference", delta=50), [0.1, -0.2, 0.3], 3, "positive"),
    (AllocateConfig(method="reference", delta=50), [0.1, 0.0, 0.3], 3, "positive"),
    (AllocateConfig(method="explicit", explicit=[2, 2]), None, 3, "has 2 entries"),
    (AllocateConfig(method="uniform", experts_per_layer=2, classifier_layers=[5]), None, 3, "outside layers"),
    (AllocateConfig(method="reference", delta=50), [0.1, 0.2], 3, "2 similarity scores for a model with 3"),
    (AllocateConfig(method="explicit", explicit=[1, 2], classifier_layers=[0]), None, 2, "dense"),
])
def test_bad_input(settings, scores, layers, message):
    with pytest.raises(LayerMoEError, match=message):
        allocate(settings, scores, layers)


AUTHORS_LLAMA_3B = Path(__file__).parent / "data" / "llama32_3b_g1_similarity.json"


def test_allocate_command_reproduces_the_authors_llama_3b_list_from_their_pair_values(tmp_path, capsys):
    """The authors' published per-pair similarities (12 new-new and new-old pairs per layer, no old-old pair) ->
    their Llama-3.2-3B G1 list with delta 70; S_i from the pairs equals PAPER.md's 4-decimal list."""
    doc = json.loads(AUTHORS_LLAMA_3B.read_text())
    assert len(doc["pairs"]) == 12 and "en|es" not in doc["pairs"]
    scores = layer_scores(doc["pairs"], doc["languages"]["old"], doc["languages"]["new"], "nn_no_mean")
    assert [round(s, 4) for s in scores] == pytest.approx(LLAMA_3B_S, abs=1.01e-4)
    out = tmp_path / "alloc"
    assert main(["allocate", "--similarity", str(AUTHORS_LLAMA_3B), "--delta", "70", "--output", str(out)]) == 0
    alloc = json.loads((out / "allocation.json").read_text())
    assert alloc["experts_per_layer"] == LLAMA_3B_N and sum(alloc["experts_per_layer"]) == 84
    assert alloc["total_new_experts"] == 56 and len(alloc["classifier_layers"]) == 7
    assert (out / "allocation.png").stat().st_size > 1000
    # an exact budget and a uniform allocation from the same file
    assert main(["allocate", "--similarity", str(AUTHORS_LLAMA_3B), "--budget", "56", "--min-new-experts", "0",
                 "--classifier-count", "0", "--output", str(tmp_path / "b")]) == 0
    budget = json.loads((tmp_path / "b" / "allocation.json").read_text())
    assert budget["total_new_experts"] == 56 and budget["classifier_layers"] == []
    capsys.readouterr()
    # what the pairs cannot give, and bad command lines: one clear error each, nothing written
    for args, message in (
            (["--delta", "70", "--aggregation", "all_pairs"], "needs every old-old pair"),
            (["--delta", "70", "--budget", "5"], "exactly one of --delta"),
            (["--delta", "10"], "smaller than the number of layers"),
            (["--uniform", "0"], "allocate.experts_per_layer: must be >= 1")):
        assert main(["allocate", "--similarity", str(AUTHORS_LLAMA_3B), *args, "--output", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["allocate", "--similarity", str(tmp_path / "missing.json"), "--delta", "70", "--output", str(out)]) == 2


def test_group_similarities_without_old_old_pairs():
    pairs = {"a|x": [0.1, 0.2], "b|x": [0.3, 0.4], "a|b": [0.5, 0.5]}
    groups = group_similarities(pairs, ["x"], ["a", "b"])  # one old language: all pairs are there
    assert groups["all_pairs"] == pytest.approx([0.3, 1.1 / 3]) and "old_old" not in groups
    pairs = {"a|x": [0.1, 0.2], "a|y": [0.3, 0.4]}
    groups = group_similarities(pairs, ["x", "y"], ["a"])
    assert set(groups) == {"new_old"} and groups["new_old"] == pytest.approx([0.2, 0.3])
    pairs["x|y"] = [0.9, 0.7]
    groups = group_similarities(pairs, ["x", "y"], ["a"])
    assert groups["old_old"] == [0.9, 0.7] and groups["all_pairs"] == pytest.approx([1.3 / 3, 1.3 / 3])
