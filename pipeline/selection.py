"""The paper's selection of one candidate direction, scored on validation prompts.

For a candidate ``r`` taken at (position, layer):

* bypass score: mean refusal score of harmful prompts with ``r̂`` ablated at every layer (lower = refusal removed);
* induce score: mean refusal score of harmless prompts with ``r`` added at its layer (higher = refusal induced);
* KL: mean KL divergence of harmless next-token distributions, baseline vs ablated (lower = less collateral).

Rules (``conf/select``): drop candidates from the last ``prune_layer_fraction`` of layers, with
``kl > kl_threshold`` or ``induce < induce_threshold``; choose the lowest bypass score.

``select.scoring`` says how much of that is computed (candidates are scored through the intervention
registry, ``ablation`` and ``addition``, several stacked per pass):

* ``exhaustive``: every score of every candidate (full heatmaps).
* ``rules_first``: each score only for candidates that pass every rule checked before it (layer, then
  induce, then KL, then bypass). The rules do not depend on the bypass score, so this picks exactly
  the exhaustive choice.
* ``halving`` (the default): the bypass score first, by successive halving: every candidate on a few
  harmful prompts, the better part of them on twice as many, and so on until the survivors are scored
  on all. Then the rules are checked in order of bypass score, and the first candidate that passes
  them is the choice: the exhaustive choice among the survivors, at a fraction of the work. If no
  survivor passes, the halved-out candidates are scored rules first, so the choice is then exactly the
  exhaustive one. ``python -m pipeline.benchmark`` checks it against ``rules_first`` on the paper's sets.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.checkpoint import Checkpoint
from pipeline.edit import Edit
from pipeline.errors import ConfigError, SelectionError
from pipeline.interventions import apply
from pipeline.models.loading import LoadedModel
from pipeline.refusal import kl_divergence, refusal_scores

log = logging.getLogger(__name__)

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


SCORING = ("halving", "rules_first", "exhaustive")
# why a candidate has no full set of scores under halving (its status in the score table)
HALVED_OUT = "halved_out"  # its bypass score on a subset of the prompts ranked it out
NOT_NEEDED = "not_needed"  # a candidate with a lower bypass score passed every rule


@dataclass(frozen=True)
class Halving:
    """Successive halving of the bypass score: ``min_prompts`` harmful prompts in the first rung, twice as
    many in each next one; after each rung the best ``keep`` fraction of candidates (at least
    ``min_keep``) goes on."""

    min_prompts: int = 8
    keep: float = 0.5
    min_keep: int = 8

    def __post_init__(self) -> None:
        if not (self.min_prompts >= 1 and self.min_keep >= 1 and 0 < self.keep <= 1):
            raise ConfigError(f"select.halving {self} is out of range",
                              "use min_prompts >= 1, min_keep >= 1 and 0 < keep <= 1")

    def rungs(self, n_prompts: int) -> list[tuple[int, int]]:
        """Prompt ranges ``[a, b)`` scored in each rung: the first ``min_prompts``, then doubling up to all."""
        bounds, b = [0], max(1, self.min_prompts)
        while b < n_prompts:
            bounds.append(b)
            b *= 2
        bounds.append(n_prompts)
        return list(zip(bounds, bounds[1:]))

    def survivors(self, n_alive: int) -> int:
        return min(n_alive, max(self.min_keep, math.ceil(n_alive * self.keep)))


@dataclass
class Scores:
    """Score grids ``[positions, n_layers + 1]`` (NaN where not computed) and baselines.

    ``bypass_prompts`` counts the harmful prompts each bypass score was measured on (fewer than all for
    a candidate halved out); ``unscored`` gives the status of candidates whose rules were not all
    checked (``HALVED_OUT``, ``NOT_NEEDED``); ``prompt_passes`` is the work done: candidate x prompt
    forward passes under an intervention."""

    bypass_score: torch.Tensor
    induce_score: torch.Tensor
    kl: torch.Tensor
    baseline_harmful: float
    baseline_harmless: float
    bypass_prompts: torch.Tensor
    unscored: dict[tuple[int, int], str]
    prompt_passes: int


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def layer_groups(cands: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    """Candidates ``(position, layer)`` in groups of at most ``size``, each of one layer, to stack into one
    forward pass: activation addition happens at the candidate's own layer."""
    return [g for layer in sorted({c[1] for c in cands}) for g in chunks([c for c in cands if c[1] == layer], size)]


def score_candidates(
    lm: LoadedModel,
    candidates: torch.Tensor,
    harmful: list[str],
    harmless: list[str],
    rules: Rules,
    scoring: str,
    batch_size: int,
    per_pass: int = 1,
    store: Checkpoint | None = None,
    halving: Halving = Halving(),
) -> Scores:
    """Score candidates, ``per_pass`` of them stacked into each forward pass (see module docstring).

    With a ``store``, every score is saved as soon as it is known, and scores already in it are not
    recomputed, so an interrupted selection resumes where it stopped.
    """
    if scoring not in SCORING:
        raise ConfigError(f"unknown select.scoring {scoring!r}", f"set it to one of {', '.join(SCORING)}")
    runner = lm.runner(batch_size, progress=False)
    prefix = lm.chat.prefix_ids
    harmful_ids, harmless_ids = lm.encode(harmful), lm.encode(harmless)
    base_harmful = runner.last_logits(harmful_ids, prefix)
    base_harmless = runner.last_logits(harmless_ids, prefix)
    n_pos, n_sites, _ = candidates.shape
    grid = {m: torch.full((n_pos, n_sites), math.nan, dtype=torch.float64) for m in METRICS}
    bypass_prompts = torch.zeros((n_pos, n_sites), dtype=torch.long)
    unscored: dict[tuple[int, int], str] = {}
    passes = 0
    todo = [(p, l) for l in range(n_sites) for p in range(n_pos)
            if scoring == "exhaustive" or (rules.layer_allowed(l, lm.n_layers) and candidates[p, l].norm() > 0)]

    def evaluate(groups, metrics, intervention, prompts, score, desc, key="") -> dict:
        """For each group of candidates: one stacked pass, then ``score(block) -> {metric: value}``;
        returns ``{candidate: {metric: value}}``. Saved under ``<metric><key>/<position>/<layer>``."""
        nonlocal passes
        out = {}
        for group in tqdm(groups, desc=desc):
            passes += len(group) * len(prompts)
            saved = [[store.get(f"{m}{key}/{p}/{l}") for m in metrics] for p, l in group] if store else None
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
                            store.put(f"{metric}{key}/{p}/{l}", value)
            out.update(zip(group, results))
        return out

    def record(results: dict) -> None:
        for c, values in results.items():
            for metric, value in values.items():
                grid[metric][c] = value
            if "bypass_score" in values:
                bypass_prompts[c] = len(harmful_ids)

    def refusal(block) -> float:
        return float(refusal_scores(block, lm.refusal_ids).mean())

    def kl(block) -> float:
        return float(kl_divergence(base_harmless, block).mean())

    def add(directions, layer):
        return apply(lm, "addition", Edit.of(directions, layer, lm.n_layers), stacked=True)

    def ablate(directions, layer):
        return apply(lm, "ablation", Edit.of(directions, layer, lm.n_layers), stacked=True)

    def induce_pass(cands: list) -> list:
        """Score induce; the candidates that pass its rule."""
        record(evaluate(layer_groups(cands, per_pass), ["induce_score"], add, harmless_ids,
                        lambda b: {"induce_score": refusal(b)}, "induce: add r on harmless"))
        return [c for c in cands if grid["induce_score"][c] >= rules.induce_threshold]

    def kl_pass(cands: list) -> list:
        record(evaluate(chunks(cands, per_pass), ["kl"], ablate, harmless_ids, lambda b: {"kl": kl(b)},
                        "KL: ablate r on harmless"))
        return [c for c in cands if grid["kl"][c] <= rules.kl_threshold]

    def rules_first(cands: list) -> None:
        record(evaluate(chunks(kl_pass(induce_pass(cands)), per_pass), ["bypass_score"], ablate, harmful_ids,
                        lambda b: {"bypass_score": refusal(b)}, "bypass: ablate r on harmful"))

    def halve(cands: list) -> list:
        """Successive halving of the bypass score (see ``Halving``); returns the survivors, scored on every
        harmful prompt, lowest bypass first. The others keep their mean over the prompts they were scored on."""
        sums = dict.fromkeys(cands, 0.0)
        alive = list(cands)
        for a, b in halving.rungs(len(harmful_ids)):
            results = evaluate(chunks(alive, per_pass), ["bypass_sum"], ablate, harmful_ids[a:b],
                               lambda block: {"bypass_sum": float(refusal_scores(block, lm.refusal_ids).sum())},
                               f"bypass: ablate r on harmful {a}-{b}", key=f"@{a}:{b}")
            for c, values in results.items():
                sums[c] += values["bypass_sum"]
                grid["bypass_score"][c] = sums[c] / b
                bypass_prompts[c] = b
            alive.sort(key=lambda c: sums[c])
            if b < len(harmful_ids):
                keep = halving.survivors(len(alive))
                unscored.update({c: HALVED_OUT for c in alive[keep:]})
                alive = alive[:keep]
        return alive

    if scoring == "exhaustive":
        induce_pass(todo)  # every candidate's induce score, whatever it is
        n = len(harmful_ids)
        record(evaluate(chunks(todo, per_pass), ["kl", "bypass_score"], ablate, harmful_ids + harmless_ids,
                        lambda b: {"kl": kl(b[n:]), "bypass_score": refusal(b[:n])}, "ablate r: bypass + KL"))
    elif scoring == "rules_first":
        rules_first(todo)
    else:
        survivors = halve(todo)
        for i, chunk in enumerate(chunks(survivors, per_pass)):
            if kl_pass(induce_pass(chunk)):  # the first that passes has the lowest bypass score of those left
                unscored.update({c: NOT_NEEDED for c in survivors[(i + 1) * per_pass:]})
                break
        else:
            halved_out = [c for c in todo if unscored.get(c) == HALVED_OUT]
            log.warning("no candidate that survived halving passes the rules; scoring the %d others rules first",
                        len(halved_out))
            for c in halved_out:
                del unscored[c]
            rules_first(halved_out)

    return Scores(grid["bypass_score"], grid["induce_score"], grid["kl"],
                  float(refusal_scores(base_harmful, lm.refusal_ids).mean()),
                  float(refusal_scores(base_harmless, lm.refusal_ids).mean()),
                  bypass_prompts, unscored, passes)


def score_table(scores: Scores, rules: Rules, n_layers: int, labels: list[str], norms: torch.Tensor) -> pd.DataFrame:
    """One row per candidate with its scores and the reason it was filtered out or not fully scored
    (``eligible`` if none).

    ``norms`` ``[positions, n_layers + 1]`` are the candidates' norms (zero-norm candidates are rejected).
    """
    n_pos, n_sites = scores.bypass_score.shape
    rows = []
    for p in range(n_pos):
        for l in range(n_sites):
            values = {m: float(getattr(scores, m)[p, l]) for m in METRICS}
            reason = scores.unscored.get((p, l)) or rules.rejection(
                l, n_layers, values["induce_score"], values["kl"], values["bypass_score"], float(norms[p, l]))
            rows.append({"position": p - n_pos, "position_label": labels[p], "layer": l, **values,
                         "bypass_prompts": int(scores.bypass_prompts[p, l]), "status": reason or "eligible"})
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
