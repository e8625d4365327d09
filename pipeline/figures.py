"""Matplotlib figures shared by the stages and the report (PNG, written atomically)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def cosine_curves(summary: pd.DataFrame, layer: int, position_titles: dict[str, str], path: Path) -> None:
    """Mean ± std cosine with the direction by layer, one panel per position, one line per prompt set.

    ``summary`` has columns ``position`` (a key of ``position_titles``), ``prompt_set``, ``layer``,
    ``mean`` and ``std``. Harmful sets are red, harmless blue; held-out test sets solid.
    """
    fig, axes = plt.subplots(1, len(position_titles), figsize=(5.5 * len(position_titles), 3.8), sharey=True,
                             squeeze=False)
    for ax, (position, title) in zip(axes[0], position_titles.items(), strict=True):
        for name, group in summary[summary.position == position].groupby("prompt_set", sort=False):
            color = "tab:red" if name.startswith("harmful") else "tab:blue"
            style = "-" if name.endswith("test") else "--"
            ax.plot(group.layer, group["mean"], style, color=color, label=name)
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
