"""What a researcher reads: metrics.jsonl across resumes, the run's log file, the heartbeat, report.md, compare."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.compare import compare_runs, to_csv, to_markdown, write_comparison
from pipeline.eval_report import EvalReport
from pipeline.report import write_report_md
from pipeline.routing_stats import LayerRouting
from pipeline.training_metrics import MetricsLog, read_metrics, step_record

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; its output as bytes decoded without newline translation."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


# ---------------------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------------------

def test_metrics_log_keeps_one_line_per_step_over_a_resume(tmp_path):
    log = MetricsLog(tmp_path, 0, write=True)
    weights = {"balance": 0.01}
    for step in range(1, 6):
        log.append(step_record(step, {"total": 2.0 + step, "ce": 2.0, "balance": float(step)}, weights, 1e-3, 0.5,
                               100 * step, 50.0, 2.0 * step))
        if step % 2 == 0:
            log.add_routing(step, {0: LayerRouting(2, [3, 1], 1.5, 0, 0.5, None)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "tot')  # a run killed while writing step 6
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[2]["balance_scaled"] == pytest.approx(0.03) and records[2]["balance"] == 3.0
    assert "ce_scaled" not in records[2] and records[4]["tokens"] == 500

    resumed = MetricsLog(tmp_path, 3, write=True)  # resumed from the checkpoint of step 3
    assert resumed.previous["step"] == 3 and resumed.previous["elapsed_s"] == 6.0
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert [e["step"] for e in json.loads((tmp_path / "routing_stats.json").read_text())] == [2]
    resumed.append(step_record(4, {"total": 1.0, "ce": 1.0}, weights, 1e-3, None, 400, 50.0, 8.0))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(Exception, match="line 2 is not valid JSON"):
        read_metrics(tmp_path / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------------------
# the log: file copy of a run's output, heartbeat
# ---------------------------------------------------------------------------------------------------------

def test_tee_output_copies_every_process_into_a_file_without_carriage_returns(tmp_path):
    log_file = tmp_path / "logs" / "run.log"
    proc = run_python(f"""
        import subprocess, sys
        from pipeline import log
        with log.tee_output({str(log_file)!r}):
            log.info("a status line")
            print("to stdout", flush=True)
            sys.stderr.write("bar  10%\\rbar  50%\\rbar 100%\\n")
            subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child error on rank 1\\\\n')"])
            sys.stderr.write("\\x1b[Alast line without a newline")
        print("after the log", flush=True)
    """)
    assert proc.returncode == 0, proc.stderr
    # the terminal gets everything unchanged
    assert "to stdout\nafter the log" in proc.stdout
    assert "bar  10%\rbar  50%\rbar 100%" in proc.stderr and "child error on rank 1" in proc.stderr
    text = log_file.read_text()
    assert "\r" not in text and "\x1b" not in text and "after the log" not in text
    lines = text.splitlines()
    assert all(line.startswith("[") for line in lines), lines
    assert any(line.endswith("] bar 100%") for line in lines) and not any("10%" in line for line in lines)
    for expected in ("a status line", "to stdout", "child error on rank 1", "last line without a newline"):
        assert sum(expected in line for line in lines) == 1, expected


def test_heartbeat_speaks_during_a_silent_phase(tmp_path):
    proc = run_python("""
        import time
        from pipeline import log
        with log.heartbeat(every=1.0):
            log.info("loading a big model")
            time.sleep(2.6)
        log.info("loaded")
        time.sleep(1.6)
    """)
    assert proc.returncode == 0, proc.stderr
    beats = [line for line in proc.stderr.splitlines() if "still working" in line]
    assert beats and all("since: loading a big model" in line for line in beats)
    assert "still working" not in proc.stderr.split("loaded")[1]  # the heartbeat ends with its block


# ---------------------------------------------------------------------------------------------------------
# report.md and compare, on reports written by hand
# ---------------------------------------------------------------------------------------------------------

def layer(experts: int, load: list[int], share: float | None, accuracy: float | None = None) -> dict:
    return {"experts": experts, "load": load, "load_max_over_mean": 1.0, "dead_experts": 0,
            "original_top1_expert0": share, "classifier_accuracy": accuracy}


def report_doc(run: str, round_name: str, new: list[str], models: dict[str, dict[str, float]],
               experts: dict[str, int], harness: dict | None = None) -> dict:
    routing = {label: {lang: {"0": layer(3, [5, 3, 2], 0.9 if lang == "en" else None, 0.8),
                              "1": layer(2, [4, 4], 0.6 if lang == "en" else None)}
                       for lang in ["en", *new]} for label in models if label != "base"}
    return {"languages": {"old": ["en"], "new": new}, "perplexity": models, "routing": routing,
            "translation": {label: {lang: {"chrf": 20.0, "sentences": 3, "examples": []} for lang in new}
                            for label in models},
            "harness": harness or {},
            "experts": {label: {"experts_per_layer": [3, 2], "classifier_layers": [0], "new_experts": n}
                        for label, n in experts.items()},
            "run": run, "round": round_name, "parameters": {label: 1_000_000 for label in models}}


def make_run(root: Path, name: str, scale: float) -> Path:
    """A run directory with two rounds' reports: g1 adds el, hu; g2 adds tr."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"rounds": [{"name": "g1", "languages": ["el", "hu"]},
                                                            {"name": "g2", "languages": ["tr"]}]}))
    base = {"en": 20.0, "el": 40.0, "hu": 60.0, "tr": 80.0}
    g1 = {lang: v * scale for lang, v in base.items()}
    g2 = {lang: v * scale * 0.9 for lang, v in base.items()}
    reports = {"g1": report_doc(name, "g1", ["el", "hu"], {"base": {k: base[k] for k in ("en", "el", "hu")},
                                                           "g1": {k: g1[k] for k in ("en", "el", "hu")}}, {"g1": 3}),
               "g2": report_doc(name, "g2", ["el", "hu", "tr"], {"base": base, "g1": g1, "g2": g2}, {"g1": 3, "g2": 5},
                                {"g2": {"pick": {"acc": 0.5, "acc_stderr": 0.1, "samples": 8.0}}})}
    for round_name, doc in reports.items():
        (run / round_name / "evaluate").mkdir(parents=True)
        (run / round_name / "evaluate" / "report.json").write_text(json.dumps(doc))
    return run


def test_compare_aligns_models_on_the_same_languages(tmp_path):
    runs = [make_run(tmp_path, "layermoe", 0.5), make_run(tmp_path, "uniform", 0.6)]
    sections = compare_runs(runs)
    assert [s.round for s in sections] == ["g1", "g2"]
    g1, g2 = sections
    assert g1.languages == ["en", "el", "hu"] and g2.languages == ["en", "el", "hu", "tr"]
    # the base model once per section (both runs scored it the same way), on that section's languages
    bases = [row for row in g2.rows if row.new_experts is None]
    assert len(bases) == 1 and bases[0].run == "(all runs)"
    assert bases[0].learned_avg == pytest.approx((40 + 60 + 80) / 3) and bases[0].round_avg == pytest.approx(80)
    assert [row.model for row in g1.rows if row.new_experts is not None] == ["g1", "g1"]
    # in round g2's section the round-1 models are scored on tr too, like every other row
    layermoe_g1 = next(r for r in g2.rows if r.run == "layermoe" and r.model == "g1")
    assert layermoe_g1.learned_avg == pytest.approx(0.5 * (40 + 60 + 80) / 3)
    markdown = to_markdown(sections)
    assert "## g2: old en; new el, hu, tr (this round: tr)" in markdown and "| (all runs) | base |" in markdown
    assert "pick acc" in markdown and "0.500 ± 0.100" in markdown
    rows = list(csv.DictReader(io.StringIO(to_csv(sections))))
    assert len(rows) == sum(len(s.rows) for s in sections)
    uniform_g2 = next(r for r in rows if r["section"] == "g2" and r["run"] == "uniform" and r["model"] == "g2")
    assert float(uniform_g2["ppl_tr"]) == pytest.approx(80 * 0.6 * 0.9) and float(uniform_g2["pick:acc"]) == 0.5
    paths = write_comparison(sections, tmp_path / "out")
    assert [p.name for p in paths] == ["compare.md", "compare.csv", "compare.png"]
    assert (tmp_path / "out" / "compare.png").stat().st_size > 10_000


def test_report_md_states_caveats_and_hides_empty_rows(tmp_path):
    run = make_run(tmp_path, "r", 0.5)
    report = EvalReport.from_json(json.loads((run / "g2" / "evaluate" / "report.json").read_text()))
    write_report_md(report, tmp_path / "report.md", [("perplexity.png", "Held-out perplexity per language")])
    md = (tmp_path / "report.md").read_text()
    assert "| en | 0.90 | 0.60 | 0.80 |" in md  # the old language's expert-0 share per layer
    assert "| el |" not in md.split("## Routing")[1].split("##")[0]  # new languages have no share: no row of dashes
    assert "classifier accuracy el 0.80" in md
    assert "Fewer than 50 test sentences: a rough indication only" in md
    assert "| g2 | - | - | 0.500 ± 0.100 |" not in md and "| g2 | 0.500 ± 0.100 |" in md
    assert "3 new experts in 2 of 2 layers (experts per layer: 3 2)" in md
    assert "![Held-out perplexity per language](perplexity.png)" in md


def test_compare_command_writes_its_files(tmp_path):
    run = make_run(tmp_path, "r", 0.5)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "compare", str(run), "--output", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("## g") == 2 and (tmp_path / "o" / "compare.csv").is_file()
    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "compare", str(tmp_path / "nothing")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr and "Traceback" not in bad.stderr
