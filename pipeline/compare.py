"""``layermoe compare``: several runs side by side, aligned on the same language sets.

Round r's report of a run scores every model of that run so far on every language known after round r, so one
section per language set (a round) compares like with like: its rows are the base model and each run's final
model of every round up to r, all from round-r reports; its columns are the old-language average, the average
over this round's new languages, the average over all languages learned so far, each language, and the
lm-evaluation-harness metrics. Output: markdown (printed), and with ``--output DIR`` compare.md, compare.csv
and compare.png there.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.atomic import read_json, write_text
from pipeline.errors import LayerMoEError
from pipeline.eval_report import EvalReport, read_report
from pipeline.plots import plot_comparison, words
from pipeline.report import fmt, harness_metrics, harness_value


@dataclass(frozen=True)
class Row:
    """One model of one run in one section."""

    run: str
    model: str
    new_experts: int | None  # None: the dense base model
    parameters: int | None
    old_avg: float | None
    old_ood_avg: float | None  # the old languages' out-of-domain text (None: none configured)
    round_avg: float | None  # this section's round's new languages
    learned_avg: float | None  # every language added so far
    perplexity: dict[str, float]
    harness: dict[str, dict[str, float]]


@dataclass
class Section:
    """Models compared on one language set: the languages known after round ``round``."""

    round: str
    old: list[str]
    learned: list[str]  # new languages of every round so far
    this_round: list[str]
    rows: list[Row] = field(default_factory=list)
    harness: list[tuple[str, str]] = field(default_factory=list)  # (task, metric) columns

    @property
    def languages(self) -> list[str]:
        return self.old + self.learned

    @property
    def title(self) -> str:
        return (f"{self.round}: old {words(self.old)}; new {words(self.learned)}"
                + (f" (this round: {words(self.this_round)})" if self.this_round != self.learned else ""))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compare_runs(run_dirs: list[Path]) -> list[Section]:
    """The comparison of ``run_dirs`` (see the module docstring), one section per language set, in round order."""
    sections: dict[tuple, Section] = {}
    for run_dir in map(Path, run_dirs):
        for report, this_round in _round_reports(run_dir):
            key = (report.round, tuple(report.languages.old), tuple(report.languages.new))
            section = sections.setdefault(key, Section(report.round, report.languages.old, report.languages.new,
                                                       this_round))
            finals = [report.base_label] + [label for label in report.models
                                            if label != report.base_label and "/" not in label]
            for label in finals:
                row = _row(run_dir.name, report, label, this_round)
                same = [i for i, r in enumerate(section.rows) if r.new_experts is None and r.perplexity == row.perplexity]
                if label == report.base_label and same:  # the same base model, scored the same way by another run
                    section.rows[same[0]] = dataclasses.replace(section.rows[same[0]], run="(all runs)")
                    continue
                section.rows.append(row)
            section.harness += [pair for pair in harness_metrics(report) if pair not in section.harness]
    if not sections:
        raise LayerMoEError("compare: no run directories given")
    return list(sections.values())


def _row(run: str, report: EvalReport, label: str, this_round: list[str]) -> Row:
    results = report.models[label]
    ppl = results.perplexity
    return Row(run, label, None if results.experts is None else results.experts.new_experts, results.parameters,
               _mean([ppl[lang] for lang in report.languages.old]), report.old_ood_average(label),
               _mean([ppl[lang] for lang in this_round]),
               _mean([ppl[lang] for lang in report.languages.new]), ppl, results.harness)


def _round_reports(run_dir: Path) -> list[tuple[EvalReport, list[str]]]:
    """The evaluate reports of a run's rounds in round order, each with its round's new languages."""
    config = read_json(run_dir / "config.json", "run config", " (not a run directory?)")
    found = []
    for rnd in config["rounds"]:
        path = run_dir / rnd["name"] / "evaluate" / "report.json"
        if path.is_file():
            found.append((read_report(path), list(rnd["languages"])))
    if not found:
        raise LayerMoEError(f"{run_dir}: no evaluate/report.json found (has the run finished a round?)")
    return found


COLUMNS = ["run", "model", "new experts (all rounds)", "parameters", "old in-domain", "old out-of-domain", "round avg",
           "learned avg"]


def _cells(section: Section, row: Row) -> list[str]:
    return [row.run, row.model, "-" if row.new_experts is None else str(row.new_experts),
            "-" if row.parameters is None else f"{row.parameters / 1e6:,.1f}M", fmt(row.old_avg), fmt(row.old_ood_avg),
            fmt(row.round_avg),
            fmt(row.learned_avg), *(fmt(row.perplexity.get(lang)) for lang in section.languages),
            *(harness_value(row.harness.get(task), metric) for task, metric in section.harness)]


def to_markdown(sections: list[Section]) -> str:
    """One table per section; 'round avg' = this round's new languages, 'learned avg' = all new languages so far."""
    lines = ["Held-out perplexity (lower is better); 'old in-domain' averages the old languages' held-out text, 'old "
             "out-of-domain' their text from a domain no training data uses; 'round avg' averages the round's new "
             "languages, 'learned avg' every language added so far. Every value in a section comes from the same evaluation (its round's "
             "reports).", ""]
    for section in sections:
        header = COLUMNS + section.languages + [f"{task} {metric}" for task, metric in section.harness]
        lines += [f"## {section.title}", "", "| " + " | ".join(header) + " |",
                  "|---|---|" + "---:|" * (len(header) - 2)]
        lines += ["| " + " | ".join(_cells(section, row)) + " |" for row in section.rows]
        lines.append("")
    return "\n".join(lines)


def to_csv(sections: list[Section]) -> str:
    """One row per (section, run, model): perplexities as numbers, one column per language and harness metric."""
    languages = list(dict.fromkeys(lang for s in sections for lang in s.languages))
    metrics = list(dict.fromkeys(pair for s in sections for pair in s.harness))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["section", "run", "model", "new_experts", "parameters", "old_avg", "old_ood_avg", "round_avg",
                     "learned_avg", *(f"ppl_{lang}" for lang in languages), *(f"{task}:{metric}" for task, metric in metrics)])
    for section in sections:
        for row in section.rows:
            writer.writerow([section.round, row.run, row.model, row.new_experts, row.parameters, row.old_avg,
                             row.old_ood_avg, row.round_avg, row.learned_avg, *(row.perplexity.get(lang) for lang in languages),
                             *(row.harness.get(task, {}).get(metric) for task, metric in metrics)])
    return buffer.getvalue()


def write_comparison(sections: list[Section], out_dir: Path) -> list[Path]:
    """compare.md, compare.csv and compare.png in ``out_dir``."""
    out_dir = Path(out_dir)
    write_text(out_dir / "compare.md", "# LayerMoE comparison\n\n" + to_markdown(sections) + "\n![compare](compare.png)\n")
    write_text(out_dir / "compare.csv", to_csv(sections))
    panels = []
    for section in sections:
        latest = [row for row in section.rows if row.new_experts is None or row.model == section.round]
        groups = section.languages + ["old avg", "new avg"]
        series = {(row.model if row.new_experts is None else f"{row.run}: {row.model}"):
                  [row.perplexity.get(lang) for lang in section.languages] + [row.old_avg, row.learned_avg]
                  for row in latest}
        panels.append((section.title, groups, series))
    plot_comparison(panels, out_dir / "compare.png")
    return [out_dir / name for name in ("compare.md", "compare.csv", "compare.png")]
