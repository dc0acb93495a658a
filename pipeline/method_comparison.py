"""Methods compared over seeds: the outcome of each run's last evaluated round, grouped by method, as mean and
standard deviation (``layermoe compare --by-method``, ``layermoe baselines``), and the figure of new-language gain
against old-language (out-of-domain) change.

A run's method is its name without a trailing ``-s<seed>`` (``layermoe baselines`` names runs ``<method>-s<seed>``).
Per run, two models of the round: the final (stage-2) model and, when it was evaluated, the stage-1 model.
Changes are relative perplexity changes against the base model, in percent, averaged over the languages of a
group (negative = lower perplexity = better); the new-language gain is minus the new-language change.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import read_json
from pipeline.errors import LayerMoEError
from pipeline.eval_report import EvalReport, read_report
from pipeline.plots import pyplot, save_figure

SEED_SUFFIX = re.compile(r"-s\d+$")
MODEL_KINDS = ("final", "stage1")  # the round's stage-2 model, and its stage-1 model


@dataclass(frozen=True)
class Outcome:
    """One model of one run, measured against the run's base model."""

    new_perplexity: float  # mean held-out perplexity over the new languages
    new_change: float  # mean % change over the new languages
    old_change: float  # mean % change over the old languages, held-out (in-domain) text
    old_ood_change: float | None  # mean % change over the old languages with out-of-domain text
    total_parameters: int | None
    trained_parameters: int | None  # trained in the round (stage 1 for the stage-1 model, both stages for the final)


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation over ``n`` runs (std 0 for a single run)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    def format(self, digits: int = 2, unit: str = "") -> str:
        return f"{self.mean:.{digits}f}{unit} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class MethodRow:
    """One method's model kind (final or stage 1), aggregated over its runs."""

    method: str
    kind: str
    runs: list[str]
    new_perplexity: Spread
    new_gain: Spread  # minus the new-language change, %
    old_change: Spread
    old_ood_change: Spread | None
    total_parameters: int | None
    trained_parameters: int | None

    def to_json(self) -> dict:
        spread = lambda s: None if s is None else {"mean": s.mean, "std": s.std, "n": s.n}
        return {"method": self.method, "model": self.kind, "runs": self.runs,
                "new_perplexity": spread(self.new_perplexity), "new_gain_percent": spread(self.new_gain),
                "old_change_percent": spread(self.old_change), "old_ood_change_percent": spread(self.old_ood_change),
                "total_parameters": self.total_parameters, "trained_parameters": self.trained_parameters}


def method_of(run_dir: Path) -> str:
    """The method a run belongs to: its directory name without a trailing ``-s<seed>``."""
    return SEED_SUFFIX.sub("", Path(run_dir).name)


def _last_round(run_dir: Path) -> tuple[str, EvalReport]:
    names = [r["name"] for r in read_json(run_dir / "config.json", "run config", " (not a run directory?)")["rounds"]]
    for name in reversed(names):
        report = run_dir / name / "evaluate" / "report.json"
        if report.is_file():
            return name, read_report(report)
    raise LayerMoEError(f"{run_dir}: no evaluate/report.json found (has the run finished a round?)")


def _trained_parameters(run_dir: Path, round_name: str, stages: tuple[int, ...]) -> int | None:
    """Parameters trained by the round's given training stages: the union of their roles (a role trained in both
    stages, e.g. the routers, counts once). None when a manifest predates the count."""
    by_role: dict[str, int] = {}
    for stage in stages:
        manifest = run_dir / round_name / f"train_stage{stage}" / "manifest.json"
        if not manifest.is_file():
            return None
        counts = read_json(manifest, "stage manifest").get("summary", {}).get("trained_parameters")
        if counts is None:
            return None
        by_role.update(counts)
    return sum(by_role.values())


def _mean_change(report: EvalReport, label: str, languages: list[str], ood: bool = False) -> float | None:
    base, mine = report.models[report.base_label], report.models[label]
    values = [(mine.ood_perplexity if ood else mine.perplexity).get(lang) for lang in languages]
    references = [(base.ood_perplexity if ood else base.perplexity).get(lang) for lang in languages]
    changes = [100 * (v - r) / r for v, r in zip(values, references) if v is not None and r is not None]
    return sum(changes) / len(changes) if changes else None


def run_outcomes(run_dir: Path) -> dict[str, Outcome]:
    """The outcomes of a run's last evaluated round: ``final`` and, when evaluated, ``stage1``."""
    round_name, report = _last_round(Path(run_dir))
    labels = {"final": round_name, "stage1": f"{round_name}/stage1"}
    outcomes = {}
    for kind, label in labels.items():
        if label not in report.models:
            continue
        results, new, old = report.models[label], report.languages.new, report.languages.old
        outcomes[kind] = Outcome(
            new_perplexity=sum(results.perplexity[lang] for lang in new) / len(new),
            new_change=_mean_change(report, label, new), old_change=_mean_change(report, label, old),
            old_ood_change=_mean_change(report, label, old, ood=True), total_parameters=results.parameters,
            trained_parameters=_trained_parameters(Path(run_dir), round_name, (1,) if kind == "stage1" else (1, 2)))
    return outcomes


def compare_methods(run_dirs: list[Path]) -> list[MethodRow]:
    """Group the runs by method (in order of first appearance) and aggregate each model kind over them."""
    groups: dict[str, list[Path]] = {}
    for run_dir in map(Path, run_dirs):
        groups.setdefault(method_of(run_dir), []).append(run_dir)
    rows = []
    for method, runs in groups.items():
        outcomes = {run: run_outcomes(run) for run in runs}
        for kind in MODEL_KINDS:
            present = {run.name: o[kind] for run, o in outcomes.items() if kind in o}
            if not present:
                continue
            values = list(present.values())
            ood = [o.old_ood_change for o in values if o.old_ood_change is not None]
            rows.append(MethodRow(
                method, kind, list(present), Spread.of([o.new_perplexity for o in values]),
                Spread.of([-o.new_change for o in values]), Spread.of([o.old_change for o in values]),
                Spread.of(ood) if len(ood) == len(values) else None,
                values[0].total_parameters, values[0].trained_parameters))
    return rows


def methods_markdown(rows: list[MethodRow]) -> str:
    """The comparison as a markdown table (mean ± std over n runs)."""
    lines = ["| method | model | n | new-language ppl | new-language gain | old in-domain change | "
             "old out-of-domain change | total params | trained params |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    millions = lambda n: "-" if n is None else f"{n / 1e6:,.1f}M"
    for r in rows:
        lines.append(f"| {r.method} | {'stage 1 only' if r.kind == 'stage1' else 'stage 1 + 2'} | {r.new_perplexity.n} | "
                     f"{r.new_perplexity.format()} | {r.new_gain.format(unit='%')} | {r.old_change.format(unit='%')} | "
                     f"{'-' if r.old_ood_change is None else r.old_ood_change.format(unit='%')} | "
                     f"{millions(r.total_parameters)} | {millions(r.trained_parameters)} |")
    return "\n".join(lines)


def plot_gain_vs_forgetting(rows: list[MethodRow], path: Path, title: str = "") -> None:
    """New-language gain (x) against old-language out-of-domain change (y; held-out where there is no
    out-of-domain text) per method, mean ± std as error bars; filled = stage 1 + 2, open = stage 1 only. The y
    axis is linear within ±2% (where "within 1% of base" is decided) and logarithmic beyond."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5))
    colors: dict[str, str] = {}
    uses_ood = all(r.old_ood_change is not None for r in rows)
    for r in rows:
        color = colors.setdefault(r.method, f"C{len(colors) % 10}")
        y = r.old_ood_change if uses_ood else r.old_change
        final = r.kind == "final"
        ax.errorbar(r.new_gain.mean, y.mean, xerr=r.new_gain.std, yerr=y.std, fmt="o" if final else "s", color=color,
                    mfc=color if final else "white", ms=7, capsize=3, lw=1.2,
                    label=f"{r.method} ({'stage 1 + 2' if final else 'stage 1 only'})")
    ax.axhline(0, color="gray", lw=0.8)
    ax.axhspan(-1, 1, color="green", alpha=0.1, label="within 1% of the base model")
    ax.set_yscale("symlog", linthresh=2)
    ax.set_yticks([t for t in (-50, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100, 200)
                   if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]])
    ax.yaxis.set_major_formatter(lambda value, _: f"{value:g}")
    ax.set_xlabel("new-language gain: mean perplexity reduction vs base (%)")
    ax.set_ylabel(f"old-language {'out-of-domain' if uses_ood else 'held-out'} perplexity change vs base (%)\n"
                  "(linear within ±2%, logarithmic beyond)")
    n = "/".join(map(str, sorted({r.new_gain.n for r in rows})))
    seeds = f"{n} seed{'' if n == '1' else 's'}"
    ax.set_title(title or f"new-language gain vs old-language forgetting (mean ± std over {seeds})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)
    plt.close(fig)
