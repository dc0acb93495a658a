"""``layermoe baselines``: what each method's runs are, and one real sweep on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_model, run_cli, synthetic_documents, write_jsonl
from pipeline.baselines import METHODS, run_overrides
from pipeline.config import load_config



@pytest.fixture(scope="module")
def sweep_config(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("baselines")
    model = make_tiny_model(root / "dense", "llama", tokenizer_dir, seed=5, layers=3)
    for lang in ("en", "el", "hu"):
        write_jsonl(root / f"{lang}.jsonl", synthetic_documents(lang, 200, seed=13))
    stage = "{steps: %d, lr: 0.003, warmup_steps: 1, micro_batch_size: 2, block_length: 32, tokens_per_language: 3000}"
    config = root / "c.yaml"
    config.write_text(f"""
name: t
old_languages: [en]
rounds: [{{name: g1, languages: [el, hu]}}, {{name: g2, languages: [tr]}}]
model: {{path: {model}}}
data:
  builtin_corpus: none
  sources: {{en: {{path: {root}/en.jsonl}}, el: {{path: {root}/el.jsonl}}, hu: {{path: {root}/hu.jsonl}},
            tr: {{path: {root}/hu.jsonl}}}}
analyze: {{tokens_per_language: 200, max_length: 32}}
allocate: {{method: reference, delta: 6, classifier_count: 1}}
train: {{stage1: {stage % 2}, stage2: {stage % 1}}}
evaluate: {{tokens_per_language: 64, block_length: 32}}
""")
    return config


def test_each_method_is_the_config_with_its_overrides(sweep_config, tmp_path):
    config = load_config(sweep_config)
    resolved = {name: load_config(sweep_config, run_overrides(config, method, 7, tmp_path, 3))
                for name, method in METHODS.items()}
    for name, c in resolved.items():
        assert c.name == f"{name}-s7" and c.seed == 7 and c.run_path == tmp_path / f"{name}-s7"
        assert [r.name for r in c.rounds] == ["g1"] and c.evaluate.include_stage1_models
        assert c.train.stage1 == config.train.stage1  # the same data and steps for every method
    for dense in ("dense_full", "dense_ffn", "lora"):
        assert resolved[dense].expansion == dense and resolved[dense].train.stage2.lr == config.train.stage1.lr
    assert resolved["moe_lpr"].allocate.method == "uniform" and resolved["moe_lpr"].allocate.experts_per_layer == 2
    assert resolved["moe_lpr"].allocate.classifier_count == 0
    assert resolved["layermoe"].allocate == config.allocate and resolved["layermoe"].expansion == "moe"
    budget = resolved["layermoe_budget"].allocate
    assert (budget.method, budget.budget, budget.min_new_experts, budget.classifier_count) == ("budget", 3, 0, 1)
    recipe = resolved["layermoe_recipe"]
    assert (recipe.train.lpr_form, recipe.train.lpr_reduction, recipe.train.classifier_label, recipe.upcycle.pooling) == (
        "double_softmax", "expert_groups", "sequence", "sequence") and recipe.allocate == config.allocate


def test_a_sweep_runs_each_method_and_seed_once_and_compares_them(sweep_config, tmp_path):
    """One method and one seed (the aggregation over seeds is checked by hand in test_eval_report.py)."""
    out = tmp_path / "sweep"
    command = ["baselines", str(sweep_config), "--seeds", "3", "--methods", "layermoe_budget", "--output", str(out)]
    proc = run_cli(command, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = out / "layermoe_budget-s3"
    assert json.loads((run / "config.json").read_text())["seed"] == 3
    assert (run / "g1" / "evaluate" / "report.json").is_file()
    assert not list((run / "g1").glob("train_stage*.checkpoints"))  # deleted once the run finished
    assert json.loads((run / "g1" / "allocate" / "allocation.json").read_text())["total_new_experts"] == 3
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [(r["method"], r["model"], r["new_gain_percent"]["n"]) for r in rows] == [
        ("layermoe_budget", "final", 1), ("layermoe_budget", "stage1", 1)]
    assert "| layermoe_budget | stage 1 + 2 | 1 |" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").stat().st_size > 5000
    again = run_cli(command, timeout=300)
    assert again.returncode == 0 and again.stderr.count("is finished, skipped") == 1
    bad = run_cli(command[:-4] + ["--methods", "magic"], timeout=300)
    assert bad.returncode == 2 and "unknown ['magic']" in bad.stderr
