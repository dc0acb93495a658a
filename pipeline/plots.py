"""PNG plots of the stage artifacts (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path

from pipeline.atomic import write_bytes


def pyplot():
    """matplotlib's pyplot with the headless backend (imported on first use: it takes a while to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG, atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes(path, buf.getvalue())


def plot_similarity(groups: dict[str, list[float]], layer_scores: list[float], title: str, path: Path) -> None:
    """Similarity by layer: one line per pair group (new-new, new-old, ...) and the layer score S_i."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    layers = range(len(layer_scores))
    for name, values in groups.items():
        ax.plot(layers, values, marker=".", label=name.replace("_", "-"))
    ax.plot(layers, layer_scores, color="black", linewidth=2, label="S (layer score)")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean cosine similarity of FFN inputs")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def plot_allocation(experts_per_layer: list[int], classifier_layers: list[int], title: str, path: Path) -> None:
    """Bar chart of total experts per layer; classifier layers are hatched."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    colors = ["tab:orange" if i in classifier_layers else "tab:blue" for i in range(len(experts_per_layer))]
    ax.bar(range(len(experts_per_layer)), experts_per_layer, color=colors)
    ax.set_xlabel("layer (orange: routing classifier)")
    ax.set_ylabel("experts (incl. original)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)
