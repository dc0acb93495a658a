"""Parameter counts from a model config, without weights."""

from __future__ import annotations

import math

import pytest

from pipeline.plan import plan

QWEN15_18B = dict(model_type="qwen2", hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                  vocab_size=151936, num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)


def two_significant_digits_truncated(x: float) -> float:
    exponent = math.floor(math.log10(x)) - 1
    return math.floor(x / 10**exponent) * 10**exponent


def test_qwen15_18b_six_experts_top2():
    p = plan(QWEN15_18B, [6] * 24, [], top_k=2)
    h, f, L, V = 2048, 5504, 24, 151936
    expert = 3 * h * f
    assert p.expert_params_per_layer == [expert] * L and expert == 33_816_576
    attention = 4 * h * h + 3 * h  # q, k, v with bias, o without
    dense = 2 * V * h + L * (attention + expert + 2 * h) + h
    assert p.dense_total == dense  # the meta-device model agrees with the hand count
    routers = L * h * 6
    assert p.total == dense + 5 * L * expert + routers
    assert p.activated == dense + 1 * L * expert + routers
    # MoE-LPR reports 5.8B total and 2.6B activated (two significant digits, truncated: 5.895B and 2.649B)
    assert two_significant_digits_truncated(p.total) == 5.8e9
    assert two_significant_digits_truncated(p.activated) == 2.6e9


def test_classifier_and_dense_layers():
    p = plan(QWEN15_18B | dict(num_hidden_layers=2), [1, 3], [1], top_k=2)
    h = 2048
    assert p.routers == 3 * h  # a dense layer has no router
    assert p.classifiers == 2 * h
    assert p.activated == p.dense_total + p.expert_params_per_layer[1] + p.routers + p.classifiers


def test_plan_command_reads_a_config_without_weights(tmp_path, capsys):
    import json

    from pipeline.cli import main

    (tmp_path / "config.json").write_text(json.dumps(QWEN15_18B))  # no weights in the directory at all
    allocation = tmp_path / "allocation.json"
    allocation.write_text(json.dumps({"experts_per_layer": [6] * 24, "classifier_layers": [5, 6]}))
    assert main(["plan", "--model", str(tmp_path), "--allocation", str(allocation)]) == 0
    out = capsys.readouterr().out
    assert "total:" in out and "activated per token:" in out and "64.5 MiB in bfloat16" in out
    assert main(["plan", "--model", str(tmp_path / "config.json"), "--experts", "6"]) == 0
    assert "5,895,112,704" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [("[6, 6]", "is not a JSON object (it holds a list)"),
                                              ('{"classifier_layers": []}', "lacks 'experts_per_layer'"),
                                              ('{"experts_per_layer": [6, "x"]}', "must be a non-empty list"),
                                              ("{not json", "is not valid JSON")])
def test_plan_with_a_bad_allocation_file_is_one_clear_error(tmp_path, capsys, content, message):
    import json

    from pipeline.cli import main

    (tmp_path / "config.json").write_text(json.dumps(QWEN15_18B))
    allocation = tmp_path / "allocation.json"
    allocation.write_text(content)
    assert main(["plan", "--model", str(tmp_path), "--allocation", str(allocation)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(allocation) in err and "Traceback" not in err
