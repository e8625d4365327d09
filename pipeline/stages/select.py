"""Stage ``select``: run the configured direction method and write its edit record.

``direction=dim`` (the default) is the paper's: every difference-in-means candidate is scored on the
validation prompts and one is chosen by the paper's rules (``pipeline.selection``). Whatever the
method, the stage writes the edit record every evaluation stage reads (``artifacts/select/edit.*``,
see ``pipeline.edit``), the method's metrics, and, when it scored candidates, their table
(``scores.csv``) and heatmaps; those are written even when no candidate is eligible, to show why.
"""

from __future__ import annotations

import logging
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline import paths  # noqa: E402
from pipeline.checkpoint import Checkpoint  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.directions import get_method  # noqa: E402
from pipeline.edit import save_edit  # noqa: E402
from pipeline.errors import SelectionError  # noqa: E402
from pipeline.figures import panel_curves  # noqa: E402
from pipeline.io import atomic_path, write_json  # noqa: E402
from pipeline.models.loading import load_model  # noqa: E402

log = logging.getLogger(__name__)


def plot_heatmaps(table: pd.DataFrame, chosen: dict | None, out_dir) -> None:
    """Heatmaps of each score by layer (x) and post-instruction position (y); the choice is starred."""
    titles = {"bypass_score": "Bypass: refusal score, harmful + ablation (lower removes refusal)",
              "induce_score": "Induce: refusal score, harmless + addition (higher induces refusal)",
              "kl": "KL(baseline || ablated) on harmless",
              "cosmic_score": "COSMIC: cosine agreement with the other side's mean (higher is better)"}
    for metric, title in titles.items():
        if metric not in table.columns:
            continue
        grid = table.pivot(index="position", columns="layer", values=metric)
        labels = table.drop_duplicates("position").set_index("position").position_label
        fig, ax = plt.subplots(figsize=(max(6, 0.28 * grid.shape[1] + 2), 0.45 * grid.shape[0] + 1.6))
        image = ax.imshow(grid.values, aspect="auto", cmap="RdBu_r" if metric != "kl" else "viridis")
        ax.set_xticks(range(grid.shape[1]), grid.columns, fontsize=7)
        ax.set_yticks(range(grid.shape[0]), [f"{p} {labels[p]!r}" for p in grid.index], fontsize=7)
        ax.set_xlabel("layer (residual stream entering the block)")
        ax.set_ylabel("post-instruction position")
        ax.set_title(title, fontsize=9)
        if chosen is not None:
            ax.plot(chosen["layer"], list(grid.index).index(chosen["position"]), marker="*", color="gold",
                    markersize=14, markeredgecolor="black")
        fig.colorbar(image, ax=ax, fraction=0.03)
        fig.tight_layout()
        with atomic_path(out_dir / f"{metric}.png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)


def write_table(table: pd.DataFrame, chosen: dict | None) -> None:
    with atomic_path(paths.stage_dir("select") / "scores.csv") as tmp:
        table.to_csv(tmp, index=False)
    plot_heatmaps(table, chosen, paths.PLOTS / "select")


CURVE_PANELS = {  # a method's curve columns worth a panel, with their labels
    "refusal_score": "refusal score, harmful val (lower: less refusal)",
    "kl": "first-token KL, harmless val",
    "ce_delta": "CE change on general text (nats)",
}


def write_curve(name: str, curve: pd.DataFrame) -> None:
    """A method's curve (e.g. ``cone_k``): the CSV is a DVC plot, the PNG goes to the report and W&B."""
    with atomic_path(paths.PLOTS / "select" / f"{name}.csv") as tmp:
        curve.to_csv(tmp, index=False)
    x = curve.columns[0]
    panel_curves(curve, x, {c: label for c, label in CURVE_PANELS.items() if c in curve.columns},
                 f"{name}: ablating more of the subspace ({x} = its dimension; 0 = unedited)",
                 paths.PLOTS / "select" / f"{name}.png")


def run(cfg: DictConfig) -> None:
    method = get_method(cfg.direction.name)
    lm = load_model(cfg.model, cfg.runtime.device)
    inputs = [paths.split_file("filter", side, "val") for side in ("harmful", "harmless")]
    checkpoint = Checkpoint.open("select", cfg, [*inputs, paths.stage_dir("directions") / "candidates.safetensors"])
    start = time.perf_counter()
    try:
        result = method(cfg, lm, checkpoint)
    except SelectionError as error:
        if error.table is not None:
            write_table(error.table, None)
        raise
    if result.table is not None:
        write_table(result.table, result.chosen)
    for name, curve in result.curves.items():
        write_curve(name, curve)
    save_edit(paths.stage_dir("select"), result.edit)
    # the method's own wall time (no model loading), compared across methods by `pipeline.compare`;
    # a run resumed from the checkpoint counts only the resumed part
    write_json(paths.metrics("select"), {**result.metrics, "selection_seconds": round(time.perf_counter() - start, 1)})
    checkpoint.clear()
    log.info("%s: layer %d, position %s: %s", cfg.direction.name, result.edit.layer, result.edit.position,
             result.metrics)


def main() -> None:
    run_stage("select", run)


if __name__ == "__main__":
    main()
