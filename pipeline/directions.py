"""Direction methods: how an edit record is found. One registered function per method, one ``conf/direction`` file.

A method gets the loaded model, the config and the stage's checkpoint, reads what it needs from the
upstream stages' outputs (``artifacts/directions``, ``artifacts/activations``, the filtered validation
splits) and returns a ``MethodResult``: the edit record, its metrics, and optionally a table of every
candidate it scored (the ``select`` stage writes them and draws the table's heatmaps).

* ``dim``: the paper's difference in means over every post-instruction position and layer, with the
  paper's selection on validation prompts (``pipeline.selection``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import paths
from pipeline.checkpoint import Checkpoint
from pipeline.edit import Edit, Kernel
from pipeline.errors import ConfigError
from pipeline.io import load_tensors, read_json
from pipeline.models.loading import LoadedModel
from pipeline.selection import Rules, choose, score_candidates, score_table
from pipeline.stages.common import instructions, read_split


@dataclass
class MethodResult:
    edit: Edit
    metrics: dict
    table: pd.DataFrame | None = None  # one row per candidate: position, position_label, layer, scores, status
    chosen: dict = field(default_factory=dict)  # the chosen row's position and layer, to mark in plots


Method = Callable[[DictConfig, LoadedModel, Checkpoint], MethodResult]
DIRECTION_METHODS: dict[str, Method] = {}


def register(name: str):
    def wrap(fn: Method) -> Method:
        DIRECTION_METHODS[name] = fn
        return fn

    return wrap


def get_method(name: str) -> Method:
    if name not in DIRECTION_METHODS:
        raise ConfigError(f"unknown direction method {name!r}", f"use one of: {', '.join(DIRECTION_METHODS)}")
    return DIRECTION_METHODS[name]


def kernel_weights(kernel_cfg: DictConfig, n_layers: int) -> dict[str, torch.Tensor]:
    """Per-layer attention / MLP weights of ``direction.kernel`` (used by ``weighted_ablation``)."""
    return {f"{part}_weights": Kernel(**kernel_cfg[part]).weights(n_layers) for part in ("attention", "mlp")}


def val_instructions() -> tuple[list[str], list[str]]:
    """The filtered harmful and harmless validation instructions."""
    return tuple(instructions(read_split("filter", side, "val")) for side in ("harmful", "harmless"))


@register("dim")
def dim(cfg: DictConfig, lm: LoadedModel, store: Checkpoint) -> MethodResult:
    """The paper's method: every difference-in-means candidate scored, the paper's rules, lowest bypass wins."""
    candidates = load_tensors(paths.stage_dir("directions") / "candidates.safetensors")["directions"]
    labels = read_json(paths.stage_dir("directions") / "candidates.json")["labels"]
    harmless_mean = load_tensors(paths.stage_dir("activations") / "means.safetensors")["harmless_mean"]
    rules = Rules.from_config(cfg.select)
    scores = score_candidates(lm, candidates, *val_instructions(), rules,
                              cfg.select.exhaustive, cfg.runtime.batch_size, cfg.select.candidates_per_pass, store)
    table = score_table(scores, rules, lm.n_layers, labels, candidates.norm(dim=-1))
    chosen = choose(table)  # a SelectionError carries the table, so the stage can still show why
    pos, layer = int(chosen.position) + candidates.shape[0], int(chosen.layer)
    edit = Edit.of(
        candidates[pos, layer], layer, lm.n_layers, position=int(chosen.position),
        position_label=chosen.position_label, harmless_mean=harmless_mean[pos, layer].float(),
        addition_coeff=float(cfg.direction.addition_coeff), **kernel_weights(cfg.direction.kernel, lm.n_layers),
        provenance={"method": "dim", "stage": "select", "model": cfg.model.name,
                    "params": OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["select", "direction"]),
                                                     resolve=True),
                    "derived_from": "artifacts/directions/candidates.safetensors"},
    )
    metrics = {
        "method": "dim",
        "position": int(chosen.position),
        "layer": layer,
        "layer_fraction": round(layer / lm.n_layers, 4),
        "bypass_score": round(float(chosen.bypass_score), 4),
        "induce_score": round(float(chosen.induce_score), 4),
        "kl": round(float(chosen.kl), 5),
        "baseline_harmful_score": round(scores.baseline_harmful, 4),
        "baseline_harmless_score": round(scores.baseline_harmless, 4),
        "n_candidates": len(table),
        "n_eligible": int((table.status == "eligible").sum()),
    }
    return MethodResult(edit, metrics, table, {"position": int(chosen.position), "layer": layer})
