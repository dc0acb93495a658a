"""The evaluation report: out-of-domain perplexity, forgetting per round, report.md, and the per-method
comparison over seeds (``layermoe compare --by-method``) with its figure."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.eval_report import EvalReport, LanguageGroups, ModelResults, RoundLanguages, read_report
from pipeline.method_comparison import compare_methods, methods_markdown, plot_gain_vs_forgetting, run_outcomes
from pipeline.compare import compare_runs, to_markdown
from pipeline.report import write_report_md


def two_round_report() -> EvalReport:
    ppl = {"base": {"en": 20.0, "el": 10.0, "hu": 40.0},
           "g1": {"en": 21.0, "el": 5.0, "hu": 30.0},
           "g2/stage1": {"en": 22.0, "el": 5.5, "hu": 16.0},
           "g2": {"en": 20.5, "el": 6.0, "hu": 15.0}}
    ood = {"base": {"en": 50.0}, "g1": {"en": 51.0}, "g2/stage1": {"en": 60.0}, "g2": {"en": 52.5}}
    models = {label: ModelResults(perplexity=p, ood_perplexity=ood[label], parameters=100 + i)
              for i, (label, p) in enumerate(ppl.items())}
    return EvalReport("run", "g2", LanguageGroups(["en"], ["el", "hu"]), models,
                      [RoundLanguages("g1", ["el"]), RoundLanguages("g2", ["hu"])])


def test_forgetting_per_round_against_the_model_that_learned_each_language(tmp_path):
    report = two_round_report()
    assert report.forgetting_by_round("base") == [] and report.forgetting_by_round("g1")[0].reference == "base"
    changes = {f.language: f for f in report.forgetting_by_round("g2")}
    assert set(changes) == {"en", "el"}  # hu is g2's own language
    assert (changes["en"].learned_in, changes["en"].reference) == ("base", "base")
    assert changes["en"].percent == pytest.approx(100 * (20.5 - 20) / 20)
    assert changes["en"].ood_percent == pytest.approx(100 * (52.5 - 50) / 50)
    assert (changes["el"].learned_in, changes["el"].reference) == ("g1", "g1")
    assert changes["el"].percent == pytest.approx(100 * (6.0 - 5.0) / 5.0) and changes["el"].ood_percent is None
    stage1 = {f.language: f.percent for f in report.forgetting_by_round("g2/stage1")}
    assert stage1 == pytest.approx({"en": 10.0, "el": 10.0})
    assert report.ood_forgetting_percent("g2") == pytest.approx({"en": 5.0})
    # report.json round trip keeps everything; report.md shows it
    doc = report.to_json()
    assert doc["forgetting_by_round"]["g2"]["el"] == {"learned_in": "g1", "reference": "g1", "percent": pytest.approx(20.0),
                                                      "ood_percent": None}
    assert doc["ood_perplexity"]["g2"] == {"en": 52.5}
    (tmp_path / "report.json").write_text(json.dumps(doc))
    again = read_report(tmp_path / "report.json")
    assert again.to_json() == doc
    write_report_md(report, tmp_path / "report.md", [])
    md = (tmp_path / "report.md").read_text()
    assert "| model | en | el | hu | en (out-of-domain) | old avg | new avg |" in md and "| g2 | 20.50 | 6.00 | 15.00 | 52.50 |" in md
    assert "| el | g1 | g1 | +20.00% | - |" in md and "| en | base | base | +2.50% | +5.00% |" in md


def write_run(root: Path, name: str, new_ppl: dict[str, float], en: float, en_ood: float, trained: dict) -> Path:
    """A finished one-round run directory: config.json, the evaluate report, the training manifests."""
    run = root / name
    (run / "g1" / "evaluate").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"rounds": [{"name": "g1", "languages": ["el", "hu"]}]}))
    base = {"en": 20.0, "el": 10.0, "hu": 40.0}
    final = {"en": en, **new_ppl}
    stage1 = {"en": en * 1.1, **{k: v * 1.05 for k, v in new_ppl.items()}}
    models = {"base": ModelResults(base, {"en": 50.0}, parameters=1000),
              "g1/stage1": ModelResults(stage1, {"en": en_ood * 1.1}, parameters=1500),
              "g1": ModelResults(final, {"en": en_ood}, parameters=1500)}
    report = EvalReport(name, "g1", LanguageGroups(["en"], ["el", "hu"]), models, [RoundLanguages("g1", ["el", "hu"])])
    (run / "g1" / "evaluate" / "report.json").write_text(json.dumps(report.to_json()))
    for stage, roles in trained.items():
        (run / "g1" / f"train_stage{stage}").mkdir()
        (run / "g1" / f"train_stage{stage}" / "manifest.json").write_text(
            json.dumps({"summary": {"trained_parameters": roles}}))
    return run


def test_methods_over_seeds_by_hand(tmp_path, capsys):
    moe = {1: {"experts_round1": 300, "routers": 20}, 2: {"routers": 20, "classifiers": 4}}
    runs = [write_run(tmp_path, "layermoe-s0", {"el": 5.0, "hu": 20.0}, 20.2, 50.5, moe),
            write_run(tmp_path, "layermoe-s1", {"el": 6.0, "hu": 24.0}, 20.0, 49.5, moe),
            write_run(tmp_path, "dense-s0", {"el": 4.0, "hu": 16.0}, 30.0, 75.0, {1: {"dense_full": 1000},
                                                                                  2: {"dense_full": 1000}})]
    outcome = run_outcomes(runs[0])["final"]
    assert outcome.new_perplexity == pytest.approx(12.5)
    assert outcome.new_change == pytest.approx((-50 + -50) / 2) and outcome.old_change == pytest.approx(1.0)
    assert outcome.old_ood_change == pytest.approx(1.0) and outcome.trained_parameters == 324
    assert run_outcomes(runs[0])["stage1"].trained_parameters == 320
    rows = compare_methods(runs)
    assert [(r.method, r.kind) for r in rows] == [("layermoe", "final"), ("layermoe", "stage1"), ("dense", "final"),
                                                  ("dense", "stage1")]
    final = rows[0]
    gains = [50.0, 100 - ((6.0 / 10 + 24.0 / 40) / 2) * 100]  # 50%, 40%
    assert final.new_gain.mean == pytest.approx(statistics.fmean(gains)) and final.new_gain.n == 2
    assert final.new_gain.std == pytest.approx(statistics.stdev(gains))
    assert final.old_ood_change.mean == pytest.approx(0.0) and final.old_ood_change.std == pytest.approx(
        statistics.stdev([1.0, -1.0]))
    assert rows[2].old_change.mean == pytest.approx(50.0) and rows[2].old_change.std == 0.0
    assert rows[2].trained_parameters == 1000 and final.total_parameters == 1500
    table = methods_markdown(rows)
    assert "| layermoe | stage 1 + 2 | 2 | 13.75 ± 1.77 | 45.00% ± 7.07 | 0.50% ± 0.71 | 0.00% ± 1.41 |" in table
    plot_gain_vs_forgetting(rows, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 5000
    assert main(["compare", "--by-method", *map(str, runs), "--figure", str(tmp_path / "cli.png")]) == 0
    assert capsys.readouterr().out.strip() == table and (tmp_path / "cli.png").exists()
    # the per-run comparison shows the old languages in-domain and out of domain
    per_run = to_markdown(compare_runs(runs[:1]))
    assert "old in-domain | old out-of-domain" in per_run and "| 20.20 | 50.50 | 12.50 |" in per_run
