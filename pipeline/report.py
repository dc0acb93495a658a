"""Human-readable reports: report.md with tables, plots, the short table printed at the end of a run, and
``compare`` across runs."""

from __future__ import annotations

from pathlib import Path

from pipeline.atomic import read_json, write_text
from pipeline.errors import LayerMoEError
from pipeline.eval_report import EvalReport, Routing, read_report
from pipeline.plots import pyplot, save_figure


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def perplexity_table(report: EvalReport) -> list[str]:
    """Markdown rows: one per model, one column per language, the out-of-domain perplexity of the languages that
    have out-of-domain text, then the old/new averages."""
    languages, ood = report.languages.all, report.ood_languages
    rows = ["| model | " + " | ".join(languages + [f"{l} (out-of-domain)" for l in ood]) + " | old avg | new avg |",
            "|---|" + "---:|" * (len(languages) + len(ood) + 2)]
    for label, results in report.models.items():
        avg = report.group_average(label)
        values = [results.perplexity[l] for l in languages] + [results.ood_perplexity.get(l) for l in ood]
        rows.append(f"| {label} | " + " | ".join(_fmt(v) for v in values) + f" | {_fmt(avg.old)} | {_fmt(avg.new)} |")
    return rows


def forgetting_tables(report: EvalReport) -> list[str]:
    """Markdown: per model, every language it knew before its round against the model that learned it (old
    languages vs the base model, an earlier round's languages vs that round's model), held-out and out-of-domain."""
    lines = []
    for label in report.models:
        changes = report.forgetting_by_round(label)
        if not changes:
            continue
        lines += [f"### {label}", "", "| language | learned in | compared with | held-out change | out-of-domain change |",
                  "|---|---|---|---:|---:|"]
        lines += [f"| {f.language} | {f.learned_in} | {f.reference} | {f.percent:+.2f}% | "
                  f"{'-' if f.ood_percent is None else f'{f.ood_percent:+.2f}%'} |" for f in changes]
        lines.append("")
    return lines


def short_table(report: EvalReport) -> str:
    """The table printed at the end of a run: perplexity base vs final model, and the experts added."""
    labels = list(report.models)
    base, final = report.models[labels[0]], report.models[labels[-1]]
    lines = [f"{'lang':<6}{'group':<6}{labels[0]:>12}{labels[-1]:>12}{'change':>9}"]
    for group, languages in (("old", report.languages.old), ("new", report.languages.new)):
        for lang in languages:
            b, f = base.perplexity[lang], final.perplexity[lang]
            lines.append(f"{lang:<6}{group:<6}{b:>12.2f}{f:>12.2f}{100 * (f - b) / b:>8.1f}%")
    for lang in report.ood_languages:  # out-of-domain text
        b, f = base.ood_perplexity[lang], final.ood_perplexity[lang]
        lines.append(f"{lang:<6}{'ood':<6}{b:>12.2f}{f:>12.2f}{100 * (f - b) / b:>8.1f}%")
    for label, results in report.models.items():
        if results.experts is not None and "/" not in label:
            lines.append(f"{label}: {results.experts.new_experts} new experts in total, per layer "
                         f"{results.experts.experts_per_layer}")
    return "\n".join(lines)


def write_report_md(report: EvalReport, out: Path, figures: list[str]) -> None:
    """report.md: perplexity, forgetting, routing, translation, and the figures."""
    models = report.models.items()
    lines = [f"# LayerMoE report: {report.run} (round {report.round})", "",
             f"Old languages: {', '.join(report.languages.old)}; new: {', '.join(report.languages.new)}.", "",
             "## Perplexity on held-out text (lower is better)", "",
             "Out-of-domain columns: text from a domain no training data uses (Debian's reference manual by default).",
             "", *perplexity_table(report), "",
             "## Forgetting: old-language perplexity change vs the base model", ""]
    for label in report.models:
        if label != report.base_label:
            change = report.forgetting_percent(label)
            ood = report.ood_forgetting_percent(label)
            lines.append(f"* {label}: " + ", ".join(f"{l} {v:+.2f}%" for l, v in change.items())
                         + ("; out-of-domain " + ", ".join(f"{l} {v:+.2f}%" for l, v in ood.items()) if ood else ""))
    by_round = forgetting_tables(report)
    if by_round:
        lines += ["", "## Forgetting per round: every earlier language vs the model that learned it", "", *by_round]
    lines += ["", "## Experts", ""]
    for label, results in models:
        if results.experts is not None:
            e = results.experts
            lines.append(f"* {label}: {e.new_experts} new experts; per layer {e.experts_per_layer}; "
                         f"classifiers in layers {e.classifier_layers}")
    lines += ["", "## Routing (per layer: share of old-language tokens whose top-1 is expert 0; classifier accuracy)", ""]
    for label, results in models:
        if results.routing is not None:
            lines += [f"### {label}", "", *_routing_table(results.routing), ""]
    translated = {label: results.translation for label, results in models if results.translation is not None}
    if any(translated.values()):
        lines += ["## Translation (few-shot en -> X, chrF)", ""]
        for label, scores in translated.items():
            lines.append(f"* {label}: " + ", ".join(f"{l} {v.chrf:.1f} ({v.sentences} sentences)"
                                                    for l, v in scores.items()))
        lines.append("")
    skipped = {label: results.harness_skipped for label, results in models if results.harness_skipped}
    if skipped:
        lines += ["## lm-evaluation-harness", "", *(f"* {label}: {msg}" for label, msg in skipped.items()), ""]
    lines += ["## Figures", "", *(f"![{Path(f).stem}]({f})" for f in figures), ""]
    write_text(out, "\n".join(lines))


def _routing_table(routing: Routing) -> list[str]:
    """Markdown rows: one per language, the expert-0 share of old-language tokens per layer, classifier accuracy."""
    layers = list(next(iter(routing.values())))
    rows = ["| language | " + " | ".join(f"L{i}" for i in layers) + " | classifier acc |",
            "|---|" + "---:|" * (len(layers) + 1)]
    for lang, per_layer in routing.items():
        share = [per_layer[i].original_top1_expert0 for i in layers]
        accuracy = [v.classifier_accuracy for v in per_layer.values() if v.classifier_accuracy is not None]
        acc = sum(accuracy) / len(accuracy) if accuracy else None
        rows.append(f"| {lang} | " + " | ".join(_fmt(s) for s in share) + f" | {_fmt(acc)} |")
    return rows


def plot_perplexity(report: EvalReport, path: Path) -> None:
    """Old/new average perplexity per model."""
    plt = pyplot()
    labels = list(report.models)
    averages = [report.group_average(label) for label in labels]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels)), 3.5))
    width = 0.38
    for offset, group in ((-width / 2, "old"), (width / 2, "new")):
        values = [getattr(avg, group) or 0 for avg in averages]
        ax.bar([i + offset for i in range(len(labels))], values, width, label=f"{group} languages")
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_ylabel("perplexity (held-out)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def plot_routing_heatmap(routing: Routing, title: str, path: Path) -> None:
    """Expert load per language: rows = languages, columns = (layer, expert) share of that layer's slots."""
    plt = pyplot()
    langs = list(routing)
    layers = sorted(routing[langs[0]])
    columns, matrix = [], []
    for lang in langs:
        row = []
        for layer in layers:
            load = routing[lang][layer].load
            total = sum(load) or 1
            row += [v / total for v in load]
        matrix.append(row)
    for layer in layers:
        columns += [f"{layer}.{e}" for e in range(len(routing[langs[0]][layer].load))]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(columns)), 0.5 * len(langs) + 1.5))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(langs)), langs)
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=5)
    ax.set_xlabel("layer.expert (share of the layer's routed slots)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)
    plt.close(fig)


def compare_runs(run_dirs: list[Path]) -> str:
    """Several runs side by side, round by round (e.g. LayerMoE vs uniform MoE-LPR): each round's model from
    that round's report, so that runs with more rounds compare on the same languages; the base model once per
    run; per-language perplexities after the averages."""
    rows, languages = [], []
    for run_dir in map(Path, run_dirs):
        reports = _round_reports(run_dir)
        for i, report in enumerate(reports):
            for label in ([report.base_label] if i == 0 else []) + [report.round]:
                results, avg = report.models[label], report.group_average(label)
                languages += [l for l in results.perplexity if l not in languages]
                experts = results.experts.new_experts if results.experts is not None else 0
                params = results.parameters
                rows.append((f"| {run_dir.name} | {report.round} | {label} | {experts} | "
                             f"{'-' if params is None else f'{params / 1e6:,.1f}M'} | {_fmt(avg.old)} | "
                             f"{_fmt(report.old_ood_average(label))} | {_fmt(avg.new)} |", results.perplexity))
    header = ["| run | round | model | new experts (all rounds) | total params | old in-domain | old out-of-domain | "
              "new ppl | " + " | ".join(languages) + " |",
              "|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(languages)]
    return "\n".join(header + [row + " " + " | ".join(_fmt(ppl.get(l)) for l in languages) + " |" for row, ppl in rows])


def _round_reports(run_dir: Path) -> list[EvalReport]:
    """The evaluate reports of a run's rounds, in round order."""
    names = [r["name"] for r in read_json(run_dir / "config.json", "run config", " (not a run directory?)")["rounds"]]
    reports = [run_dir / name / "evaluate" / "report.json" for name in names]
    found = [read_report(r) for r in reports if r.is_file()]
    if not found:
        raise LayerMoEError(f"{run_dir}: no evaluate/report.json found (has the run finished a round?)")
    return found
