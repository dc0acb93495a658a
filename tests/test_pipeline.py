"""The analyze -> allocate pipeline through the command line: artifacts, manifests, skipping, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, synthetic_documents, train_stores, write_jsonl
from pipeline.allocate import reference_allocation
from pipeline.analyze import language_means
from pipeline.base_model import load_causal_lm
from pipeline.cli import main
from pipeline.packing import load_tokenizer
from pipeline.similarity import pairwise_similarities
from pipeline.upcycle import is_moe_block

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_config(tmp_path, tokenizer_dir) -> Path:
    model = make_tiny_model(tmp_path / "model", "llama", tokenizer_dir, seed=3, layers=4)
    for lang in ("en", "el", "hu", "tr"):
        write_jsonl(tmp_path / "data" / f"{lang}.jsonl", synthetic_documents(lang, 60, seed=9))
    config = tmp_path / "run.yaml"
    config.write_text(f"""
name: t
run_dir: {tmp_path}/runs/{{name}}
cache_dir: {tmp_path}/cache
old_languages: [en]
rounds:
  - {{name: g1, languages: [el, hu, tr]}}
  - {{name: g2, languages: [hu2]}}
model: {{path: {model}}}
data:
  builtin_corpus: none
  sources:
    en: {{path: {tmp_path}/data/en.jsonl}}
    el: {{path: {tmp_path}/data/el.jsonl}}
    hu: {{path: {tmp_path}/data/hu.jsonl}}
    tr: {{path: {tmp_path}/data/tr.jsonl}}
    hu2: {{path: {tmp_path}/data/hu.jsonl}}
analyze: {{tokens_per_language: 500, batch_size: 4, max_length: 64}}
allocate: {{method: reference, delta: 9, classifier_count: 2}}
evaluate: {{block_length: 64}}  # the held-out text is short: the tokenize stage checks that it holds a block
""")
    return config


def test_run_writes_contract_artifacts_and_skips_when_unchanged(run_config, tmp_path, capsys):
    assert main(["run", str(run_config), "--until", "upcycle"]) == 0
    g1 = tmp_path / "runs" / "t" / "g1"
    sim = json.loads((g1 / "analyze" / "similarity.json").read_text())
    assert sim["languages"] == {"old": ["en"], "new": ["el", "hu", "tr"]}
    assert sim["num_layers"] == 4 and len(sim["layer_scores"]) == 4
    assert set(sim["pairs"]) == {"en|el", "en|hu", "en|tr", "el|hu", "el|tr", "hu|tr"}
    assert sim["tokens"] == {lang: 500 for lang in ("en", "el", "hu", "tr")}
    alloc = json.loads((g1 / "allocate" / "allocation.json").read_text())
    # the configured method (reference, delta 9) applied to this run's layer scores; classifiers in the two most
    # similar MoE layers
    scores = sim["layer_scores"]
    assert alloc["experts_per_layer"] == reference_allocation(scores, 9)
    moe_layers = [i for i, n in enumerate(alloc["experts_per_layer"]) if n > 1]
    assert alloc["classifier_layers"] == sorted(sorted(moe_layers, key=lambda i: -scores[i])[:2])
    assert reference_allocation(scores[::-1], 9) != alloc["experts_per_layer"]  # a reversed score list would show
    assert alloc["new_experts_per_layer"] == [n - 1 for n in alloc["experts_per_layer"]]
    for stage in ("analyze", "allocate"):
        manifest = json.loads((g1 / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["wall_time_s"] >= 0
        assert "torch" in manifest["versions"] and manifest["inputs"]
    assert (g1 / "analyze" / "similarity.png").stat().st_size > 1000
    assert (g1 / "allocate" / "allocation.png").stat().st_size > 1000
    upcycled = json.loads((g1 / "upcycle" / "manifest.json").read_text())["summary"]
    assert upcycled["experts_per_layer"] == alloc["experts_per_layer"]
    assert upcycled["max_logit_difference"] <= 1e-5
    expanded = load_causal_lm(g1 / "upcycle" / "model")
    assert expanded.config.rounds == [{"name": "g1", "languages": ["el", "hu", "tr"]}]
    err = capsys.readouterr().err
    assert "stopping before round 'g2'" in err  # round 2 needs round 1's trained model

    before = (g1 / "analyze" / "manifest.json").read_text()
    assert main(["run", str(run_config), "--until", "upcycle"]) == 0
    assert "g1/analyze: up to date" in capsys.readouterr().err
    assert (g1 / "analyze" / "manifest.json").read_text() == before

    # a changed allocate setting re-runs allocate only
    assert main(["allocate", str(run_config), "allocate.delta=12", "--round", "g1"]) == 0
    err = capsys.readouterr().err
    assert "g1/allocate: inputs or settings changed" in err and "analyze" not in err
    assert json.loads((g1 / "allocate" / "allocation.json").read_text())["experts_per_layer"] == \
        reference_allocation(scores, 12)


def test_analyze_hooks_the_moe_block_of_an_expanded_model(run_config, tmp_path):
    """A freshly upcycled model has the dense model's FFN inputs, so its similarity is the dense one."""
    assert main(["run", str(run_config), "--until", "upcycle"]) == 0
    dense = load_causal_lm(tmp_path / "model")
    expanded = load_causal_lm(tmp_path / "runs" / "t" / "g1" / "upcycle" / "model")
    assert any(is_moe_block(layer.mlp) for layer in expanded.base.model.layers)
    tokenizer = load_tokenizer(tmp_path / "model")
    stores = train_stores(tmp_path / "stores", tmp_path / "model",
                          {lang: synthetic_documents(lang, 20, seed=4) for lang in ("en", "el", "hu")})
    results = []
    for model in (dense, expanded):
        means, _ = language_means(model, tokenizer, stores, 300, 64, 4, False)
        results.append(pairwise_similarities(means))
    for key in results[0]:
        assert max(abs(a - b) for a, b in zip(results[0][key], results[1][key])) <= 1e-6


def test_failing_stage_leaves_nothing_partial(run_config, tmp_path):
    # an impossible budget fails inside allocate, after analyze succeeded
    assert main(["run", str(run_config), "--until", "upcycle", "allocate.delta=2"]) == 2
    g1 = tmp_path / "runs" / "t" / "g1"
    assert (g1 / "analyze" / "manifest.json").exists()
    assert not (g1 / "allocate").exists()
    assert not [p for p in g1.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_an_upcycled_model_that_does_not_reproduce_the_dense_one_stops_the_run(run_config, tmp_path):
    """The upcycle check with a tolerance below float32 rounding: exit 2, one line, no upcycle directory."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(run_config), "--until", "upcycle",
                           "upcycle.verify_tolerance=1e-30"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "upcycled model does not reproduce the dense model: max logit difference" in errors[0]
    assert "> upcycle.verify_tolerance 1e-30" in errors[0] and "Traceback" not in proc.stderr
    g1 = tmp_path / "runs" / "t" / "g1"
    assert (g1 / "allocate" / "allocation.json").exists() and not (g1 / "upcycle").exists()
    assert not [p.name for p in g1.iterdir() if p.name.startswith(".")]


def test_an_unexpected_exception_is_not_a_clean_exit(run_config):
    """A bug (here a stage that raises ZeroDivisionError) keeps its traceback and exits 1, unlike bad input (2)."""
    script = ("import dataclasses, sys\nfrom pipeline import stages\nfrom pipeline.cli import main\n"
              "def broken(*args, **kwargs):\n    return 1 / 0\n"
              "stages.STAGES = tuple(dataclasses.replace(s, run=broken) if s.name == 'analyze' else s "
              "for s in stages.STAGES)\n"
              f"sys.exit(main(['analyze', {str(run_config)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ZeroDivisionError: division by zero" in proc.stderr


def test_bad_config_exits_nonzero_with_one_clear_line(run_config):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "analyze", str(run_config), "analyze.batch_size=-1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "ERROR: analyze.batch_size: must be >= 1" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_directory_of_another_experiment_is_refused_unless_starting_over(run_config, tmp_path, capsys):
    assert main(["run", str(run_config), "--until", "analyze"]) == 0
    run_dir = tmp_path / "runs" / "t"
    saved = (run_dir / "config.json").read_text()
    # other hyper-parameters and more rounds: the same experiment, continued
    assert main(["run", str(run_config), "--until", "analyze", "analyze.batch_size=2", f"data.sources.tr3.path={tmp_path}/data/tr.jsonl",
                 "rounds=[{name: g1, languages: [el, hu, tr]}, {name: g2, languages: [hu2]}, {name: g3, languages: [tr3]}]"]) == 0
    # another base-language set, another round 1, another source for a language: refused, nothing touched
    capsys.readouterr()
    other = ["old_languages=[en, el]", "rounds.0.languages=[hu, tr]"]
    assert main(["run", str(run_config), "--until", "analyze", *other]) == 2
    assert main(["analyze", str(run_config), f"data.sources.el.path={tmp_path}/data/tr.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of a different experiment (old_languages: ['en'] -> ['en', 'el']; " in err
    assert "rounds[0]: g1 ['el', 'hu', 'tr'] -> g1 ['hu', 'tr']" in err and "--start-over" in err
    assert "data.sources.el: " in err
    assert json.loads((run_dir / "config.json").read_text())["rounds"][-1]["name"] == "g3"
    assert (run_dir / "g1" / "analyze" / "similarity.json").exists()
    # told to start over: the old run is deleted
    assert main(["run", str(run_config), "--until", "analyze", *other, "--start-over"]) == 0
    assert json.loads((run_dir / "config.json").read_text())["old_languages"] == ["en", "el"]
    assert json.loads((run_dir / "g1" / "analyze" / "similarity.json").read_text())["languages"]["old"] == ["en", "el"]
    assert saved != (run_dir / "config.json").read_text()


def test_a_bfloat16_model_upcycles_within_the_default_tolerance_and_stays_bfloat16(run_config, tmp_path):
    """The paper configs use model.dtype bfloat16: the function-preservation check runs in float32 (bf16 rounding of
    the expert mix is not a broken upcycle), and the expanded model is saved in bfloat16 with exact expert copies."""
    assert main(["run", str(run_config), "--until", "upcycle", "model.dtype=bfloat16"]) == 0
    upcycle_dir = tmp_path / "runs" / "t" / "g1" / "upcycle"
    summary = json.loads((upcycle_dir / "manifest.json").read_text())["summary"]
    assert summary["max_logit_difference"] <= 1e-3
    model = load_causal_lm(upcycle_dir / "model", "bfloat16")
    from safetensors import safe_open

    with safe_open(str(upcycle_dir / "model" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    block = next(m for m in model.modules() if is_moe_block(m))
    for name, tensor in block.experts[0].state_dict().items():
        for expert in list(block.experts)[1:]:
            assert torch.equal(expert.state_dict()[name], tensor)


def test_the_time_left_sums_the_stages_timed_in_an_earlier_round_and_names_the_others(capsys):
    from pipeline.runner import RunProgress

    stages = ["tokenize", "train_stage1", "evaluate"]
    plan = [(r, s) for r in ("g1", "g2", "g3") for s in stages]
    took = {("g1", "tokenize"): 60, ("g1", "train_stage1"): 3600, ("g1", "evaluate"): 0.2,  # up to date: skipped
            ("g2", "tokenize"): 30, ("g2", "train_stage1"): 1800, ("g2", "evaluate"): 120}
    progress, headers = RunProgress(len(plan)), []
    for i, (round_name, stage) in enumerate(plan):
        progress.header(round_name, stage, [s for _, s in plan[i + 1:]])
        headers.append(capsys.readouterr().err.strip().splitlines()[-1])
        progress.finished(stage, took.get((round_name, stage), 1))
    assert "stage 1/9: g1/tokenize" in headers[0]
    assert headers[0].endswith("time left not known yet, not yet timed: tokenize, train_stage1, evaluate)")
    # stages that have not run are named, not guessed; the sum of the timed ones is then a lower bound
    assert headers[1].endswith("at least 2m00s left, not yet timed: train_stage1, evaluate)")  # 2 x tokenize
    assert headers[3].endswith("at least 2h02m left, not yet timed: evaluate)")  # 2 x (60 s + 3600 s)
    # g2's evaluate ran: from there on every stage ahead has a time (the last time it ran)
    assert headers[6].endswith("about 32m30s left)")  # g3: 30 s + 1800 s + 120 s
    assert headers[8].endswith("about 2m00s left)") and "stage 9/9: g3/evaluate" in headers[8]
