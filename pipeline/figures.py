"""Matplotlib figures shared by the stages and the report (PNG, written atomically)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _default_style(name: str) -> tuple[str, str]:
    """Harmful sets red, harmless blue; held-out test sets solid, validation sets dashed."""
    return "tab:red" if name.startswith("harmful") else "tab:blue", "-" if name.endswith("test") else "--"


def cosine_curves(summary: pd.DataFrame, layer: int, position_titles: dict[str, str], path: Path,
                  style: Callable[[str], tuple[str, str]] = _default_style) -> None:
    """Mean ± std cosine with the direction by layer, one panel per position, one line per prompt set.

    ``summary`` has columns ``position`` (a key of ``position_titles``), ``prompt_set``, ``layer``,
    ``mean`` and ``std``; ``style(prompt_set)`` gives each line's (colour, line style).
    """
    fig, axes = plt.subplots(1, len(position_titles), figsize=(5.5 * len(position_titles), 3.8), sharey=True,
                             squeeze=False)
    for ax, (position, title) in zip(axes[0], position_titles.items(), strict=True):
        for name, group in summary[summary.position == position].groupby("prompt_set", sort=False):
            color, dashes = style(name)
            ax.plot(group.layer, group["mean"], dashes, color=color, label=name)
            low, high = group["mean"] - group["std"], group["mean"] + group["std"]
            ax.fill_between(group.layer, low, high, color=color, alpha=0.12, linewidth=0)
        ax.axvline(layer, color="black", linewidth=0.8, linestyle=":", label=f"direction's layer ({layer})")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer (residual stream entering the block)")
    axes[0][0].set_ylabel("cosine similarity with r (mean ± std)")
    axes[0][-1].legend(fontsize=7)
    _save(fig, path)


def refusal_bars(rates: pd.DataFrame, path: Path) -> None:
    """Horizontal bars of refusal rate (``rate`` in [0, 1]) per ``condition``, labelled with the value."""
    fig, ax = plt.subplots(figsize=(6.5, 0.42 * len(rates) + 1.2))
    colors = ["tab:red" if c.startswith("harmful") else "tab:blue" for c in rates.condition]
    bars = ax.barh(rates.condition, rates.rate, color=colors)
    ax.bar_label(bars, labels=[f"{v:.0%}" for v in rates.rate], fontsize=8, padding=3)
    ax.set_xlim(0, 1.1)
    ax.invert_yaxis()
    ax.set_xlabel("refusal rate")
    ax.set_title("Refusal rate per condition", fontsize=10)
    _save(fig, path)


def loss_curve(losses: pd.DataFrame, title: str, path: Path) -> None:
    """``loss`` by ``step`` (an optimisation's progress)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses.step, losses.loss, marker=".", color="tab:purple")
    ax.set_xlabel("step")
    ax.set_ylabel("target cross-entropy")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def panel_curves(curve: pd.DataFrame, x: str, panels: dict[str, str], title: str, path: Path) -> None:
    """One small line chart per column in ``panels`` (column -> y label), all against column ``x``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (column, label) in zip(axes[0], panels.items(), strict=True):
        ax.plot(curve[x], curve[column], marker="o", color="tab:purple")
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.set_xticks(curve[x])
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def histograms(values: dict[str, list[float]], style: Callable[[str], tuple[str, str]], title: str, xlabel: str,
               path: Path) -> None:
    """Overlaid histograms of one scalar per prompt, one per prompt set (``style`` gives the colour)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    bins = np.histogram_bin_edges([x for xs in values.values() for x in xs], bins=40)  # shared, so sets compare
    for name, xs in values.items():
        color, dashes = style(name)
        ax.hist(xs, bins=bins, histtype="step", linestyle=dashes, color=color, linewidth=1.5, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("prompts")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def similarity_heatmaps(matrices: dict[str, pd.DataFrame], marked: int, path: Path) -> None:
    """Square layer-by-layer cosine-similarity heatmaps, one panel per title; ``marked`` layer dotted."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.6 * len(matrices), 4.2), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], matrices.items(), strict=True):
        image = ax.imshow(matrix.values, cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
        for line in (ax.axvline, ax.axhline):
            line(list(matrix.columns).index(marked), color="black", linewidth=0.6, linestyle=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=list(axes[0]), fraction=0.03)
    with atomic_path(path) as tmp:  # no tight_layout: it cannot place a colorbar shared by several panels
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def grouped_bars(table: pd.DataFrame, panels: dict[str, str], style: Callable[[str], tuple[str, str]], title: str,
                 path: Path) -> None:
    """One panel per value column (``panels``: column -> y label), one bar group per ``item``, one bar per
    ``prompt_set`` (coloured by ``style``)."""
    items = list(dict.fromkeys(table["item"]))
    sets = list(dict.fromkeys(table["prompt_set"]))
    width = 0.8 / len(sets)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.5, 0.9 * len(items) + 2), 2.8 * len(panels)),
                             squeeze=False, sharex=True)
    for ax, (column, label) in zip(axes[:, 0], panels.items(), strict=True):
        for k, name in enumerate(sets):
            rows = table[table.prompt_set == name].set_index("item").reindex(items)
            color, dashes = style(name)
            ax.bar([i + (k - (len(sets) - 1) / 2) * width for i in range(len(items))], rows[column], width,
                   color=color, alpha=0.55 if dashes == "--" else 0.9, label=name)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_ylabel(label, fontsize=8)
    axes[0, 0].set_title(title, fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=2)
    axes[-1, 0].set_xticks(range(len(items)), items, fontsize=8)
    _save(fig, path)
