"""PNG figures of the stage artifacts and reports (matplotlib, headless), sized and labelled for a slide: words in
titles, labelled axes and colour bars, integer ticks for counts, ticks a reader can read."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.atomic import write_bytes
from pipeline.eval_report import EvalReport, Routing
from pipeline.routing_stats import LayerRouting

STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10, "ytick.labelsize": 10,
         "legend.fontsize": 10, "axes.spines.top": False, "axes.spines.right": False}
ROUND_COLORS = ["#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def pyplot():
    """matplotlib's pyplot with the headless backend and this package's style (imported on first use: it takes
    a while to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG, atomically, and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    write_bytes(path, buf.getvalue())
    pyplot().close(fig)


def words(items: Sequence[object]) -> str:
    """['el', 'hu', 'tr'] -> 'el, hu, tr' (titles never show Python lists)."""
    return ", ".join(str(i) for i in items)


def _integer_axis(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _log_axis(ax, values: Sequence[float]) -> None:
    """A log y axis with plain-number tick labels at 1-2-5 steps over the data's range (a log axis over less
    than a decade gets no labels from matplotlib's defaults)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    positive = [v for v in values if v and v > 0]
    ax.set_yscale("log")
    steps = [m * 10 ** e for e in range(int(np.floor(np.log10(min(positive)))) - 1,
                                        int(np.ceil(np.log10(max(positive)))) + 2) for m in (1, 2, 5)]
    low = max(step for step in steps if step <= min(positive) / 1.1)  # a labelled tick below the lowest bar
    high = max(positive) * 1.6  # room for the values above the bars
    ticks = [step for step in steps if low <= step <= high]
    ax.set_ylim(low, high)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())


# ----------------------------------------------------------------------------------------------------------
# analyze, allocate
# ----------------------------------------------------------------------------------------------------------


def plot_similarity(groups: dict[str, list[float]], layer_scores: list[float], title: str, path: Path) -> None:
    """Similarity by layer: one line per pair group (new-new, new-old, ...) and the layer score S_i."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    layers = range(len(layer_scores))
    names = {"new_new": "new-new pairs", "new_old": "new-old pairs", "old_old": "old-old pairs"}
    for name, values in groups.items():
        ax.plot(layers, values, marker=".", label=names.get(name, name.replace("_", "-")))
    ax.plot(layers, layer_scores, color="black", linewidth=2, label="S, the layer score (mean of\nnew-new and new-old)")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean cosine similarity\nof FFN inputs")
    _integer_axis(ax.xaxis)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    save_figure(fig, path)


def plot_allocation(expert_rounds: list[list[int]], round_names: list[str], classifier_layers: list[int], title: str,
                    path: Path) -> None:
    """The model's total experts per layer as stacked bars, one colour per round that added them (the original
    FFN first); layers with a routing classifier are marked."""
    plt = pyplot()
    layers = len(expert_rounds)
    fig, ax = plt.subplots(figsize=(max(8, 0.3 * layers + 2), 4))
    bottom = np.zeros(layers)
    for q, name in enumerate(["original FFN", *round_names]):
        counts = np.array([sum(1 for r in layer if r == q) for layer in expert_rounds], dtype=float)
        ax.bar(range(layers), counts, bottom=bottom, color=ROUND_COLORS[q % len(ROUND_COLORS)], edgecolor="white",
               linewidth=0.5, label=name if q == 0 else f"added in {name}")
        bottom += counts
    if classifier_layers:
        ax.scatter(classifier_layers, bottom[classifier_layers] + 0.35, marker="v", color="black", s=25,
                   label="routing classifier", zorder=3)
    ax.set_xlabel("layer")
    ax.set_ylabel("experts in the layer")
    ax.set_xticks(range(0, layers, 2 if layers > 16 else 1))
    _integer_axis(ax.yaxis)
    ax.set_ylim(0, bottom.max() + 1)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()  # the bars bottom-up, then the classifier marker
    order = sorted(range(len(labels)), key=lambda i: labels[i] == "routing classifier")
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left", bbox_to_anchor=(1.01, 1),
              frameon=False)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------


def expert_load_figure(layers: dict[int, LayerRouting], title: str):
    """A figure of one routing interval: rows = MoE layers, columns = experts (0 = the original FFN), colour =
    the expert's share of the layer's routed slots (blank where a layer has fewer experts). The caller closes it."""
    plt = pyplot()
    indices = sorted(layers)
    width = max(layers[i].experts for i in indices)
    shares = np.full((len(indices), width), np.nan)
    for row, i in enumerate(indices):
        load = np.asarray(layers[i].load, dtype=float)
        if load.sum() > 0:
            shares[row, :len(load)] = load / load.sum()
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * width, 1.5 + 0.22 * len(indices)))
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(width), ["0\n(orig.)"] + [str(e) for e in range(1, width)])
    ax.set_yticks(range(len(indices)), [str(i) for i in indices])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the layer's routed slots")
    return fig


LOSS_LABELS = {"balance": "load balance", "lpr": "LPR", "classifier": "classifier"}


def trailing_mean(values: Sequence[float], window: int) -> np.ndarray:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    values = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def plot_loss_curves(stages: dict[int, list[dict]], weights: dict[str, float], title: str, path: Path) -> None:
    """A round's training curves from metrics.jsonl: per stage (columns), the cross-entropy and the total loss
    (top) and each auxiliary loss unweighted, its weight in the legend (bottom). The mean over the last few steps
    is drawn thick, each step's value thin (batches of different languages make single steps noisy; not for the
    total, which would hide the cross-entropy's)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(stages), figsize=(5.5 * len(stages), 6), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [3, 2]})
    for column, (stage, records) in enumerate(sorted(stages.items())):
        top, bottom = axes[0][column], axes[1][column]
        steps = [r["step"] for r in records]
        window = max(1, min(len(steps) // 8, 200))

        def draw(ax, key: str, label: str, color: str, each_step: bool = True, **style) -> None:
            values = [r[key] for r in records]
            if each_step:
                ax.plot(steps, values, color=color, linewidth=0.8, alpha=0.35)
            ax.plot(steps, trailing_mean(values, window), color=color, linewidth=2, label=label, **style)

        draw(top, "ce", "cross-entropy", "tab:blue")
        draw(top, "total", "total (optimised)", "black", each_step=False, linestyle="--")
        top.set_title(f"stage {stage}: {'new experts + routers' if stage == 1 else 'routers + classifiers'}")
        top.set_ylabel("loss")
        top.grid(alpha=0.3)
        top.legend(loc="best", framealpha=0.9, title=f"thick: mean of {window} steps" if window > 1 else None,
                   title_fontsize=9)
        auxiliary = [name for name in LOSS_LABELS if name in records[0]]
        for name, color in zip(auxiliary, ("tab:orange", "tab:green", "tab:red")):
            draw(bottom, name, f"{LOSS_LABELS[name]}, weight {weights[name]:g}", color)
        bottom.set_ylabel("auxiliary loss\n(unweighted)")
        bottom.set_xlabel("optimizer step")
        _integer_axis(bottom.xaxis)
        bottom.grid(alpha=0.3)
        if auxiliary:
            bottom.legend(loc="best", framealpha=0.9)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------


def _grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]]) -> None:
    """Bars of every series side by side in each group, with a legend to the right of the axes; a line separates
    the averages (groups named '... avg') from the languages."""
    width = 0.8 / max(len(series), 1)
    for s, (name, values) in enumerate(series.items()):
        xs = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
        color = ROUND_COLORS[0] if s == 0 and name.startswith("base") else None
        bars = ax.bar(xs, [v or 0 for v in values], width, label=name, color=color)
        if len(series) <= 4:  # the values, where they still fit above the bars
            ax.bar_label(bars, [f"{v:.3g}" if v else "" for v in values], fontsize=8, padding=1)
    ax.set_xticks(range(len(groups)), groups)
    averages = [g for g, name in enumerate(groups) if name.endswith(" avg")]
    if averages:
        ax.axvline(averages[0] - 0.5, color="black", linewidth=0.8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.grid(axis="y", alpha=0.3)


def plot_perplexity(report: EvalReport, path: Path) -> None:
    """Held-out perplexity of every model on every language, then the old- and new-language averages."""
    plt = pyplot()
    languages = report.languages.all
    groups = languages + ["old avg", "new avg"]
    series = {}
    for label, results in report.models.items():
        average = report.group_average(label)
        series[label] = [results.perplexity[lang] for lang in languages] + [average.old, average.new]
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(groups) * (len(series) + 1) + 2), 4))
    _grouped_bars(ax, groups, series)
    _log_axis(ax, [v for values in series.values() for v in values if v])
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{report.run}, round {report.round}: perplexity per language (lower is better)")
    save_figure(fig, path)


def plot_routing_heatmap(routing: Routing, title: str, path: Path, top_k: int = 2) -> None:
    """Expert load per language: rows = languages, columns = the experts of each MoE layer (grouped by layer,
    expert 0 = the original FFN first), colour = the expert's share of the layer's routed slots. Layers whose
    top-k uses every expert (2 experts under top-2) and that have no classifier always split evenly; they are
    left out and named below the plot."""
    plt = pyplot()
    languages = list(routing)
    layers = sorted(routing[languages[0]])
    informative = [i for i in layers if routing[languages[0]][i].experts > top_k
                   or any(routing[lang][i].classifier_accuracy is not None for lang in languages)]
    omitted = [i for i in layers if i not in informative]
    columns, boundaries, centres = [], [], []
    for i in informative:
        experts = routing[languages[0]][i].experts
        centres.append(len(columns) + (experts - 1) / 2)
        columns += [(i, e) for e in range(experts)]
        boundaries.append(len(columns) - 0.5)
    matrix = np.full((len(languages), len(columns)), np.nan)
    for row, lang in enumerate(languages):
        for col, (i, e) in enumerate(columns):
            load = routing[lang][i].load
            if sum(load):
                matrix[row, col] = load[e] / sum(load)
    fig, ax = plt.subplots(figsize=(min(max(7, 0.16 * len(columns) + 3), 18), 0.45 * len(languages) + 2))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    for x in boundaries[:-1]:
        ax.axvline(x, color="white", linewidth=1.5)
    ax.set_yticks(range(len(languages)), languages)
    ax.set_xticks(centres, [str(i) for i in informative])
    ax.set_xlabel("layer (each cell = one expert, the original FFN first)")
    ax.set_ylabel("language of the tokens")
    ax.set_title(title)
    if omitted:
        ax.text(0, -0.2 - 0.25 / (0.45 * len(languages) + 2), f"Not shown: layers {words(omitted)} (2 experts, "
                f"top-{top_k}, no classifier: always an even split)", transform=ax.transAxes, fontsize=9, va="top")
    fig.colorbar(image, ax=ax, label="share of the layer's\nrouted slots", fraction=0.04, pad=0.02)
    save_figure(fig, path)


def plot_comparison(sections: list[tuple[str, list[str], dict[str, list[float | None]]]], path: Path) -> None:
    """``layermoe compare``'s figure: one panel per language set (a round), grouped bars of perplexity per
    language and the averages, one bar per model."""
    plt = pyplot()
    fig, axes = plt.subplots(len(sections), 1, figsize=(11, 3.6 * len(sections)), squeeze=False)
    for ax, (title, groups, series) in zip(axes[:, 0], sections):
        _grouped_bars(ax, groups, series)
        _log_axis(ax, [v for values in series.values() for v in values if v])
        ax.set_ylabel("held-out perplexity\n(log scale)")
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
