"""Stage ``geometry``: the refusal direction, with and without adversarial suffixes, and across layers.

1. For each prompt set of the ``suffix`` stage (held-out harmful prompts alone, with the adversarial
   suffix, with the random one; the same for the suffix's own optimisation prompts; harmless prompts):
   the cosine of the residual stream with ``r`` and its projection on ``r̂`` at every layer and
   post-instruction position (the last one is the last prompt token). The paper's finding: the
   adversarial suffix pulls harmful prompts' cosine towards the harmless level, the random one does not.
   ``gap_closed`` measures it at the direction's layer: (harmful - harmful+suffix) / (harmful - harmless).
2. For every candidate direction (``artifacts/directions``): its cosine similarity with the candidates
   of every other layer at the same position, i.e. how the direction turns with depth.
"""

from __future__ import annotations

import logging
import math

import pandas as pd
from omegaconf import DictConfig

from pipeline import figures, paths
from pipeline.analysis.geometry import direction_readout, layer_similarity
from pipeline.cli import run_stage
from pipeline.edit import load_edit
from pipeline.io import atomic_path, load_tensors, read_json, write_json
from pipeline.models.loading import load_model
from pipeline.stages.projections import curves, long_table, wide
from pipeline.stages.suffix import SUFFIX_KINDS, analysis_disabled, prompt_sets, read_suffixes, style

log = logging.getLogger(__name__)

PLOT_DIR = paths.PLOTS / "geometry"


def _csv(frame: pd.DataFrame, name: str) -> None:
    with atomic_path(paths.stage_dir("geometry") / name) as tmp:
        frame.to_csv(tmp, index=False)


def _number(value: float) -> float | None:
    """Rounded for metrics; None for NaN (e.g. a similarity with the all-zero layer-0 candidate)."""
    return None if math.isnan(value) else round(float(value), 4)


def gap_closed(means: pd.Series) -> dict[str, float | None]:
    """Per suffixed set: the share of the harmful-harmless gap in ``means`` (by prompt set) that the suffix removes."""
    out = {}
    for name in means.index:
        group, _, kind = name.rpartition("_")
        if kind in SUFFIX_KINDS:
            gap = means[group] - means["harmless"]
            out[name] = _number((means[group] - means[name]) / gap) if gap else None
    return out


def similarity_table(similarity, labels: list[str]) -> pd.DataFrame:
    """Long form of ``[positions, layers, layers]``: position, position_label, layer, other_layer, cosine."""
    n_pos, n_sites, _ = similarity.shape
    index = pd.MultiIndex.from_product([range(-n_pos, 0), range(n_sites), range(n_sites)],
                                       names=["position", "layer", "other_layer"])
    frame = pd.DataFrame({"cosine": similarity.reshape(-1).numpy()}, index=index).reset_index()
    frame.insert(1, "position_label", [labels[p] for p in frame.position])
    return frame


def run(cfg: DictConfig) -> None:
    if analysis_disabled(cfg, "geometry"):
        return
    lm = load_model(cfg.model, cfg.runtime.device)
    edit = load_edit(lm, cfg.eval.edit)
    direction = edit.direction
    labels = lm.chat.post_instruction_labels()
    sets = prompt_sets(lm, cfg, read_suffixes())
    readouts = {name: direction_readout(lm, s.ids, direction, cfg.runtime.batch_size, desc=name)
                for name, s in sets.items()}
    table = long_table({n: r.cosine for n, r in readouts.items()}, labels,
                       {n: r.projection for n, r in readouts.items()})
    _csv(table, "cosine.csv")
    summary = curves(table)
    layer, position = edit.layer, edit.position
    views = {"last_token": -1, "direction_position": position}
    for view, pos in views.items():
        _csv(wide(summary, pos, list(sets)).round(5), f"cosine_{view}.csv")
    figures.cosine_curves(
        summary, layer,
        {-1: f"last token {labels[-1]!r}", position: f"direction's position {position} {edit.position_label!r}"},
        PLOT_DIR / "cosine_by_layer.png", style=style,
    )
    at = table[(table.layer == layer) & (table.position == position)]
    figures.histograms({name: group.projection.tolist() for name, group in at.groupby("prompt_set", sort=False)},
                       style, f"Projection on r̂ at the direction's layer {layer}, position {position}",
                       "residual stream · r̂", PLOT_DIR / "projections.png")

    candidates = load_tensors(paths.stage_dir("directions") / "candidates.safetensors")["directions"]
    similarity = similarity_table(layer_similarity(candidates), read_json(
        paths.stage_dir("directions") / "candidates.json")["labels"])
    _csv(similarity.round(5), "candidate_similarity.csv")
    panels = {f"position {p} {similarity[similarity.position == p].position_label.iloc[0]!r}":
              similarity[similarity.position == p].pivot(index="layer", columns="other_layer", values="cosine")
              for p in dict.fromkeys([position, -1])}
    figures.similarity_heatmaps(panels, layer, PLOT_DIR / "candidate_similarity.png")

    metrics: dict = {"enabled": True, "layer": layer, "position": position}
    for key, column in (("cosine_at_layer", "cosine"), ("projection_at_layer", "projection")):
        metrics[key] = {}
        for view, pos in views.items():
            means = table[(table.layer == layer) & (table.position == pos)].groupby("prompt_set", sort=False)[column]
            metrics[key][view] = {name: round(float(v), 4) for name, v in means.mean().items()}
    metrics["gap_closed"] = {
        view: gap_closed(pd.Series(metrics["cosine_at_layer"][view])) for view in views
    }
    chosen = similarity[(similarity.position == position) & (similarity.layer == layer)].set_index("other_layer")
    metrics["candidate_similarity"] = {
        "chosen_vs_previous_layer": _number(chosen.cosine[layer - 1]),
        "chosen_vs_next_layer": _number(chosen.cosine[min(layer + 1, lm.n_layers)]),
        "chosen_vs_last_layer": _number(chosen.cosine[lm.n_layers]),
    }
    write_json(paths.metrics("geometry"), metrics)
    log.info("geometry at layer %d: %s", layer, metrics)


def main() -> None:
    run_stage("geometry", run)


if __name__ == "__main__":
    main()
