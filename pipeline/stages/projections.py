"""Stage ``projections``: cosine similarity of harmful and harmless activations with the chosen direction.

For every validation (filtered) and test prompt, the cosine between the residual stream and ``r`` at
every layer, at the post-instruction tokens (``pipeline.analysis.geometry``). Harmful prompts should
point along ``r`` from around the chosen layer on and harmless ones should not: the curve shows
where the direction is expressed and how cleanly it separates the two sets.
"""

from __future__ import annotations

import logging

import pandas as pd
from omegaconf import DictConfig

from pipeline import figures, paths
from pipeline.analysis.geometry import cosine_by_layer
from pipeline.cli import run_stage
from pipeline.edit import load_edit
from pipeline.io import atomic_path, write_json
from pipeline.models.loading import load_model
from pipeline.stages.common import instructions, read_split

log = logging.getLogger(__name__)

# prompt set -> (stage that wrote the split, side, split); validation sets are the filtered ones
PROMPT_SETS = {
    "harmful_val": ("filter", "harmful", "val"),
    "harmless_val": ("filter", "harmless", "val"),
    "harmful_test": ("data", "harmful", "test"),
    "harmless_test": ("data", "harmless", "test"),
}
PLOT_DIR = paths.PLOTS / "projections"


def long_table(cosines: dict, labels: list[str], projections: dict | None = None) -> pd.DataFrame:
    """One row per (prompt set, prompt, position, layer) from ``{set: [prompts, positions, layers]}``
    (plus a ``projection`` column from ``projections``, same shape, when given)."""
    n_pos = len(labels)
    frames = []
    for name, values in cosines.items():
        n, _, n_sites = values.shape
        index = pd.MultiIndex.from_product([range(n), range(-n_pos, 0), range(n_sites)],
                                           names=["prompt", "position", "layer"])
        columns = {"cosine": values.reshape(-1).numpy()}
        if projections is not None:
            columns["projection"] = projections[name].reshape(-1).numpy()
        frame = pd.DataFrame(columns, index=index).reset_index()
        frame.insert(0, "prompt_set", name)
        frame.insert(3, "position_label", [labels[p] for p in frame.position])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def curves(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over prompts per (prompt set, position, layer)."""
    grouped = table.groupby(["prompt_set", "position", "layer"], sort=False).cosine
    return grouped.agg(["mean", "std"]).reset_index()


def wide(summary: pd.DataFrame, position: int, sets: list[str] | None = None) -> pd.DataFrame:
    """``layer`` plus one mean-cosine column per prompt set (default ``PROMPT_SETS``), at one position
    (a DVC line plot)."""
    at = summary[summary.position == position]
    return at.pivot(index="layer", columns="prompt_set", values="mean")[sets or list(PROMPT_SETS)].reset_index()


def run(cfg: DictConfig) -> None:
    lm = load_model(cfg.model, cfg.runtime.device)
    edit = load_edit(lm, cfg.eval.edit)
    direction = edit.direction
    labels = lm.chat.post_instruction_labels()
    cosines = {
        name: cosine_by_layer(lm, lm.encode(instructions(read_split(stage, side, split))), direction,
                              cfg.runtime.batch_size, desc=name)
        for name, (stage, side, split) in PROMPT_SETS.items()
    }
    table = long_table(cosines, labels)
    with atomic_path(paths.stage_dir("projections") / "cosine.csv") as tmp:
        table.to_csv(tmp, index=False)
    summary = curves(table)
    layer, position = edit.layer, edit.position
    views = {"last_token": -1, "direction_position": position}
    for view, pos in views.items():
        with atomic_path(PLOT_DIR / f"cosine_{view}.csv") as tmp:
            wide(summary, pos).round(5).to_csv(tmp, index=False)
    figures.cosine_curves(
        summary, layer,
        {-1: f"last token {labels[-1]!r}",
         position: f"direction's position {position} {edit.position_label!r}"},
        PLOT_DIR / "cosine_by_layer.png",
    )
    at_layer = summary[summary.layer == layer]
    metrics: dict = {"layer": layer, "position": position}
    for view, pos in views.items():
        means = at_layer[at_layer.position == pos].set_index("prompt_set")["mean"]
        metrics[view] = {name: round(float(means[name]), 4) for name in PROMPT_SETS}
        metrics[view]["test_separation"] = round(float(means["harmful_test"] - means["harmless_test"]), 4)
    write_json(paths.metrics("projections"), metrics)
    log.info("cosine with r at layer %d: %s", layer, metrics)


def main() -> None:
    run_stage("projections", run)


if __name__ == "__main__":
    main()
