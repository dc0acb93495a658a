"""Human-readable evaluation reports: report.md with its tables and figures, and the short table printed at the
end of a run."""

from __future__ import annotations

from pathlib import Path

from pipeline.atomic import write_text
from pipeline.eval_report import FEW_SENTENCES, EvalReport, Routing


def fmt(value: float | None, digits: int = 2) -> str:
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
        rows.append(f"| {label} | " + " | ".join(fmt(v) for v in values) + f" | {fmt(avg.old)} | {fmt(avg.new)} |")
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


def experts_in_words(experts_per_layer: list[int]) -> str:
    """[1, 3, 2] -> '3 new experts in 2 of 3 layers (per layer: 1 3 2)'."""
    new = sum(n - 1 for n in experts_per_layer)
    expanded = sum(1 for n in experts_per_layer if n > 1)
    return (f"{new} new experts in {expanded} of {len(experts_per_layer)} layers "
            f"(experts per layer: {' '.join(map(str, experts_per_layer))})")


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
            lines.append(f"{label}: {experts_in_words(results.experts.experts_per_layer)}")
    return "\n".join(lines)


def write_report_md(report: EvalReport, out: Path, figures: list[tuple[str, str]]) -> None:
    """report.md: perplexity, forgetting, experts, routing, translation, harness tasks, and the figures
    (``(file name, caption)`` pairs)."""
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
            lines.append(f"* {label}: {experts_in_words(e.experts_per_layer)}; routing classifiers in layers "
                         f"{', '.join(map(str, e.classifier_layers)) or 'none'}")
    routed = [(label, results.routing) for label, results in models if results.routing is not None]
    if routed:
        lines += ["", "## Routing", "",
                  "Per layer, the share of old-language tokens whose top-1 expert is expert 0 (the original FFN), "
                  "and the routing classifiers' mean accuracy (old vs new language).", ""]
        for label, routing in routed:
            lines += [f"### {label}", "", *_routing_table(routing), ""]
    translated = {label: results.translation for label, results in models if results.translation}
    if translated:
        lines += ["## Translation (few-shot English -> X, chrF)", ""]
        few = any(score.few_sentences for scores in translated.values() for score in scores.values())
        if few:
            lines += [f"Fewer than {FEW_SENTENCES} test sentences: a rough indication only, not a basis for "
                      f"comparing models.", ""]
        for label, scores in translated.items():
            lines.append(f"* {label}: " + ", ".join(f"{l} {v.chrf:.1f} ({v.sentences} sentences)"
                                                    for l, v in scores.items()))
        lines.append("")
    harness = harness_table(report)
    if harness:
        lines += ["## lm-evaluation-harness", "", *harness, ""]
    lines += ["## Figures", ""]
    for name, caption in figures:
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    write_text(out, "\n".join(lines))


def harness_metrics(report: EvalReport) -> list[tuple[str, str]]:
    """The (task, metric) pairs of the report's harness results, in a stable order, without standard errors and
    sample counts (shown beside the value instead)."""
    pairs: list[tuple[str, str]] = []
    for results in report.models.values():
        for task, metrics in results.harness.items():
            pairs += [(task, m) for m in metrics if not m.endswith("_stderr") and m != "samples"
                      and "/" not in m and (task, m) not in pairs]
    return pairs


def harness_value(metrics: dict[str, float] | None, metric: str) -> str:
    """'0.412 ± 0.021' (or '-' when not measured)."""
    if not metrics or metric not in metrics:
        return "-"
    error = metrics.get(f"{metric}_stderr")
    return f"{metrics[metric]:.3f}" + (f" ± {error:.3f}" if error is not None else "")


def harness_table(report: EvalReport) -> list[str]:
    """Markdown rows: one per model, one column per (task, metric); empty when no task was run."""
    pairs = harness_metrics(report)
    if not pairs:
        return []
    samples = {task: metrics.get("samples") for results in report.models.values()
               for task, metrics in results.harness.items()}
    rows = ["| model | " + " | ".join(f"{task} {metric}" for task, metric in pairs) + " |",
            "|---|" + "---:|" * len(pairs)]
    for label, results in report.models.items():
        rows.append(f"| {label} | " + " | ".join(harness_value(results.harness.get(task), metric)
                                                for task, metric in pairs) + " |")
    counts = ", ".join(f"{task} {count:.0f}" for task, count in samples.items() if count is not None)
    return rows + ([f"\nExamples per task: {counts}."] if counts else [])


def _routing_table(routing: Routing) -> list[str]:
    """Markdown rows: one per language that has old-language tokens (the share is undefined for the others),
    the expert-0 share per layer, classifier accuracy."""
    layers = list(next(iter(routing.values())))
    rows = ["| language | " + " | ".join(f"L{i}" for i in layers) + " | classifier acc |",
            "|---|" + "---:|" * (len(layers) + 1)]
    without = []
    for lang, per_layer in routing.items():
        share = [per_layer[i].original_top1_expert0 for i in layers]
        accuracy = [v.classifier_accuracy for v in per_layer.values() if v.classifier_accuracy is not None]
        acc = sum(accuracy) / len(accuracy) if accuracy else None
        if all(s is None for s in share):
            without.append((lang, acc))
            continue
        rows.append(f"| {lang} | " + " | ".join(fmt(s) for s in share) + f" | {fmt(acc)} |")
    if without:
        rows.append("\nNew languages (no expert-0 share to show): classifier accuracy "
                    + ", ".join(f"{lang} {fmt(acc)}" for lang, acc in without) + ".")
    return rows
