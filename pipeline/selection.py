"""The paper's selection of one candidate direction, scored on validation prompts.

For a candidate ``r`` taken at (position, layer):

* bypass score: mean refusal score of harmful prompts with ``r̂`` ablated at every layer (lower = refusal removed);
* induce score: mean refusal score of harmless prompts with ``r`` added at its layer (higher = refusal induced);
* KL: mean KL divergence of harmless next-token distributions, baseline vs ablated (lower = less collateral).

Rules (``conf/select``): drop candidates from the last ``prune_layer_fraction`` of layers, with
``kl > kl_threshold`` or ``induce < induce_threshold``; choose the lowest bypass score.

Unless ``exhaustive`` is set, each score is computed only for candidates that still pass every rule
checked before it (layer, then induce, then KL, then bypass). The rules do not depend on the bypass
score, so this picks exactly the direction exhaustive scoring picks, with less work. Candidates are
scored through the intervention registry (``ablation`` and ``addition``), several stacked per pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.checkpoint import Checkpoint
from pipeline.edit import Edit
from pipeline.errors import SelectionError
from pipeline.interventions import apply
from pipeline.models.loading import LoadedModel
from pipeline.refusal import kl_divergence, refusal_scores

METRICS = ("bypass_score", "induce_score", "kl")


@dataclass(frozen=True)
class Rules:
    kl_threshold: float
    induce_threshold: float
    prune_layer_fraction: float

    @classmethod
    def from_config(cls, select_cfg: DictConfig) -> Rules:
        return cls(select_cfg.kl_threshold, select_cfg.induce_threshold, select_cfg.prune_layer_fraction)

    def layer_allowed(self, layer: int, n_layers: int) -> bool:
        return layer < int(n_layers * (1.0 - self.prune_layer_fraction))

    def rejection(self, layer: int, n_layers: int, induce: float, kl: float, bypass: float,
                  norm: float = 1.0) -> str | None:
        """Why a candidate is filtered out (checked in the order scores are computed), or None."""
        if not self.layer_allowed(layer, n_layers):
            return "late_layer"
        if not norm > 0:  # e.g. layer 0, where every prompt has the same post-instruction embeddings
            return "zero_direction"
        if not induce >= self.induce_threshold:  # also rejects NaN
            return "induce_below_threshold"
        if not kl <= self.kl_threshold:
            return "kl_above_threshold"
        if not math.isfinite(bypass):
            return "bypass_not_finite"
        return None


@dataclass
class Scores:
    """Score grids ``[positions, n_layers + 1]`` (NaN where not computed) and baselines."""

    bypass_score: torch.Tensor
    induce_score: torch.Tensor
    kl: torch.Tensor
    baseline_harmful: float
    baseline_harmless: float


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def score_candidates(
    lm: LoadedModel,
    candidates: torch.Tensor,
    harmful: list[str],
    harmless: list[str],
    rules: Rules,
    exhaustive: bool,
    batch_size: int,
    per_pass: int = 1,
    store: Checkpoint | None = None,
) -> Scores:
    """Score candidates, ``per_pass`` of them stacked into each forward pass (see module docstring).

    With a ``store``, every score is saved as soon as it is known, and scores already in it are not
    recomputed, so an interrupted selection resumes where it stopped.
    """
    runner = lm.runner(batch_size, progress=False)
    prefix = lm.chat.prefix_ids
    harmful_ids, harmless_ids = lm.encode(harmful), lm.encode(harmless)
    base_harmful = runner.last_logits(harmful_ids, prefix)
    base_harmless = runner.last_logits(harmless_ids, prefix)
    n_pos, n_sites, _ = candidates.shape
    grid = {m: torch.full((n_pos, n_sites), math.nan, dtype=torch.float64) for m in METRICS}
    todo = [(p, l) for l in range(n_sites) for p in range(n_pos)
            if exhaustive or (rules.layer_allowed(l, lm.n_layers) and candidates[p, l].norm() > 0)]

    def evaluate(groups, metrics, intervention, prompts, score, desc):
        """For each group of candidates: one stacked pass, then ``score(block) -> {metric: value}``."""
        for group in tqdm(groups, desc=desc):
            saved = [[store.get(f"{m}/{p}/{l}") for m in metrics] for p, l in group] if store else None
            if saved is not None and all(v is not None for row in saved for v in row):
                results = [dict(zip(metrics, row)) for row in saved]
            else:
                directions = torch.stack([candidates[c] for c in group])
                with intervention(directions, group[0][1]):
                    logits = runner.last_logits_stacked(prompts, prefix, copies=len(group))
                results = [score(block) for block in logits]
                for (p, l), values in zip(group, results):
                    for metric, value in values.items():
                        if store is not None:
                            store.put(f"{metric}/{p}/{l}", value)
            for (p, l), values in zip(group, results):
                for metric, value in values.items():
                    grid[metric][p, l] = value

    def refusal(block) -> float:
        return float(refusal_scores(block, lm.refusal_ids).mean())

    def kl(block) -> float:
        return float(kl_divergence(base_harmless, block).mean())

    def add(directions, layer):
        return apply(lm, "addition", Edit.of(directions, layer, lm.n_layers), stacked=True)

    def ablate(directions, layer):
        return apply(lm, "ablation", Edit.of(directions, layer, lm.n_layers), stacked=True)

    # activation addition happens at the candidate's own layer, so a pass stacks candidates of one layer
    by_layer = [[c for c in todo if c[1] == l] for l in range(n_sites)]
    evaluate([g for same in by_layer for g in _chunks(same, per_pass)], ["induce_score"], add, harmless_ids,
             lambda b: {"induce_score": refusal(b)}, "induce: add r on harmless")
    if exhaustive:
        n = len(harmful_ids)
        evaluate(_chunks(todo, per_pass), ["kl", "bypass_score"], ablate, harmful_ids + harmless_ids,
                 lambda b: {"kl": kl(b[n:]), "bypass_score": refusal(b[:n])}, "ablate r: bypass + KL")
    else:
        todo = [c for c in todo if grid["induce_score"][c] >= rules.induce_threshold]
        evaluate(_chunks(todo, per_pass), ["kl"], ablate, harmless_ids, lambda b: {"kl": kl(b)},
                 "KL: ablate r on harmless")
        todo = [c for c in todo if grid["kl"][c] <= rules.kl_threshold]
        evaluate(_chunks(todo, per_pass), ["bypass_score"], ablate, harmful_ids,
                 lambda b: {"bypass_score": refusal(b)}, "bypass: ablate r on harmful")

    return Scores(grid["bypass_score"], grid["induce_score"], grid["kl"],
                  float(refusal_scores(base_harmful, lm.refusal_ids).mean()),
                  float(refusal_scores(base_harmless, lm.refusal_ids).mean()))


def score_table(scores: Scores, rules: Rules, n_layers: int, labels: list[str], norms: torch.Tensor) -> pd.DataFrame:
    """One row per candidate with its scores and the reason it was filtered out (``eligible`` if none).

    ``norms`` ``[positions, n_layers + 1]`` are the candidates' norms (zero-norm candidates are rejected).
    """
    n_pos, n_sites = scores.bypass_score.shape
    rows = []
    for p in range(n_pos):
        for l in range(n_sites):
            values = {m: float(getattr(scores, m)[p, l]) for m in METRICS}
            reason = rules.rejection(l, n_layers, values["induce_score"], values["kl"], values["bypass_score"],
                                     float(norms[p, l]))
            rows.append({"position": p - n_pos, "position_label": labels[p], "layer": l, **values,
                         "status": reason or "eligible"})
    return pd.DataFrame(rows)


def choose(table: pd.DataFrame) -> pd.Series:
    """The eligible candidate with the lowest bypass score (first in table order on ties)."""
    eligible = table[table.status == "eligible"]
    if eligible.empty:
        counts = table.status.value_counts().to_dict()
        raise SelectionError(
            f"every candidate direction was filtered out ({counts})",
            "relax select.kl_threshold / select.induce_threshold, or check that the model refuses the harmful "
            "prompts (metrics/filter.json); the full score table is in artifacts/select/scores.csv",
            table=table,
        )
    return eligible.loc[eligible.bypass_score.idxmin()]
