"""A multi-objective search over ablation parameters: fewer refusals, less damage (Optuna).

The search space is ``weighted_ablation``'s (``pipeline.edit``, ``pipeline.interventions``):

* the direction: the selected one, or the difference-in-means candidate at a fractional layer index of
  the selected position (unit directions of the two neighbouring layers interpolated);
* for attention writes and for MLP writes separately, a layer kernel: peak weight, peak position, floor
  weight (as a share of the peak) and width (``pipeline.edit.Kernel``); the embedding is not edited;
* the variant: ``plain`` (hooks), ``projected`` (the direction made orthogonal to the harmless mean
  first) or ``norm_preserving`` (the weight edit that keeps each written vector's norm).

Two objectives, both minimised: the number of refusals among the search's harmful prompts (greedy
completions judged by substring matching, each stopped once a refusal phrase settles its verdict), and
the mean KL divergence of the next-token distribution at the end of each harmless prompt, from the
unedited model (its logits computed once) to the edited one. A trial never copies the model: hooks are
removed, in-place weight edits undone, when it ends.

Trials live in Optuna's RDB storage (an SQLite file by default; PostgreSQL or MySQL for several
workers): a killed search resumes the same study and loses at most its running trial.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
import torch

from pipeline.edit import Edit, Kernel
from pipeline.generation import complete
from pipeline.hooks import unit
from pipeline.interventions import apply, projected
from pipeline.models.loading import LoadedModel
from pipeline.refusal import is_refusal, kl_divergence

log = logging.getLogger(__name__)

VARIANTS = {"plain": "weighted_ablation", "projected": "weighted_ablation",
            "norm_preserving": "norm_preserving_ablation"}
COMPONENTS = ("attention", "mlp")
SAMPLERS = ("tpe", "nsga2")


def direction_at(candidates: torch.Tensor, index: float) -> torch.Tensor:
    """The unit direction at a fractional layer ``index`` of ``candidates`` ``[n_sites, d]``: the unit
    candidates of the two neighbouring layers, interpolated linearly and normalised."""
    low = int(math.floor(index))
    high = min(low + 1, candidates.shape[0] - 1)
    share = index - low
    return unit((1 - share) * unit(candidates[low]) + share * unit(candidates[high]))


def suggest(trial: optuna.Trial, n_layers: int, variants: Sequence[str], max_peak: float) -> dict:
    """Sample one point of the search space (define-by-run: the layer index only for ``layer`` sources)."""
    params = {"source": trial.suggest_categorical("source", ["selected", "layer"])}
    if params["source"] == "layer":
        params["direction_layer"] = trial.suggest_float("direction_layer", 1.0, float(n_layers - 1))
    for part in COMPONENTS:
        params[f"{part}_peak"] = trial.suggest_float(f"{part}_peak", 0.0, max_peak)
        params[f"{part}_position"] = trial.suggest_float(f"{part}_position", 0.0, float(n_layers - 1))
        params[f"{part}_floor"] = trial.suggest_float(f"{part}_floor", 0.0, 1.0)
        params[f"{part}_width"] = trial.suggest_float(f"{part}_width", 1.0, float(n_layers))
    params["variant"] = trial.suggest_categorical("variant", list(variants))
    return params


def kernel(params: dict, part: str) -> Kernel:
    peak = params[f"{part}_peak"]
    return Kernel(peak, params[f"{part}_position"], params[f"{part}_floor"] * peak, params[f"{part}_width"])


def trial_edit(params: dict, base: Edit, candidates: torch.Tensor) -> tuple[Edit, str]:
    """The edit record of one point of the space and the registered intervention that applies it.

    ``candidates`` ``[n_sites, d]`` are the difference-in-means candidates at the selected position.
    """
    direction = base.direction if params["source"] == "selected" else direction_at(candidates,
                                                                                    params["direction_layer"])
    edit = Edit(unit(direction)[None], base.layer, base.n_layers,
                kernel(params, "attention").weights(base.n_layers), kernel(params, "mlp").weights(base.n_layers),
                embedding_weight=0.0, harmless_mean=base.harmless_mean, addition_layer=base.addition_layer,
                addition_coeff=base.addition_coeff, position=base.position, position_label=base.position_label)
    if params["variant"] == "projected":
        edit = projected(edit)
    return edit, VARIANTS[params["variant"]]


@dataclass
class Objective:
    """Refusals on harmful prompts and first-token KL on harmless ones, for one trial's parameters."""

    lm: LoadedModel
    base: Edit
    candidates: torch.Tensor
    harmful: list[str]
    harmless_ids: list[list[int]]
    reference: torch.Tensor  # unedited last-token logits of harmless_ids
    refusal_substrings: list[str]
    max_new_tokens: int
    batch_size: int
    variants: tuple[str, ...]
    max_peak: float

    def evaluate(self, params: dict) -> tuple[int, float]:
        return self.measure(*trial_edit(params, self.base, self.candidates))

    def measure(self, edit: Edit, name: str) -> tuple[int, float]:
        """(refusals, mean KL) of intervention ``name`` with ``edit``."""
        runner = self.lm.runner(self.batch_size, progress=False)
        with apply(self.lm, name, edit):
            logits = runner.last_logits(self.harmless_ids, self.lm.chat.prefix_ids)
            refusals = self.refusals()
        return refusals, float(kl_divergence(self.reference, logits).mean())

    def refusals(self) -> int:
        """Refusals among the harmful prompts under whatever intervention is active."""
        texts = complete(self.lm, self.harmful, self.max_new_tokens, self.batch_size, "search: harmful",
                         stop_at=self.refusal_substrings)
        return sum(is_refusal(t, self.refusal_substrings) for t in texts)

    def __call__(self, trial: optuna.Trial) -> tuple[int, float]:
        start = time.perf_counter()
        params = suggest(trial, self.base.n_layers, self.variants, self.max_peak)
        refusals, kl = self.evaluate(params)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 2))
        log.info("trial %d: %d refusals, KL %.4f (%s)", trial.number, refusals, kl, params["variant"])
        return refusals, kl


def sampler(name: str, seed: int, startup_trials: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")


def storage(url: str) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats: a trial whose worker died is marked failed once its heartbeat is stale."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9; we rely on them knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90, engine_kwargs=engine)


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def optimize(study: optuna.Study, objective: Objective, n_trials: int) -> int:
    """Run trials until the study holds ``n_trials`` complete ones (counting every worker's); returns how
    many this call ran. A re-run after a kill only runs the missing ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    ran = 0
    while len(completed(study)) < n_trials:
        study.optimize(objective, n_trials=1, catch=())
        ran += 1
    return ran


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (no worse in both objectives, better in one)."""
    return [i for i, (a, b) in enumerate(points)
            if not any((c <= a and d <= b) and (c < a or d < b) for c, d in points)]


def hypervolume(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` (minimisation) and bounded by ``reference``; points beyond it count nothing."""
    inside = sorted({(a, b) for a, b in points if a < reference[0] and b < reference[1]})
    area, ceiling = 0.0, reference[1]
    for a, b in inside:  # by the first objective, ascending: each point adds the strip below the last ceiling
        if b < ceiling:
            area += (reference[0] - a) * (ceiling - b)
            ceiling = b
    return area


def choose(trials: Sequence[optuna.trial.FrozenTrial], kl_budget: float) -> tuple[optuna.trial.FrozenTrial, bool]:
    """The fewest refusals with KL at most ``kl_budget`` (lower KL on ties); without any within budget, the
    lowest KL. Returns the trial and whether it is within budget."""
    within = [t for t in trials if t.values[1] <= kl_budget]
    if within:
        return min(within, key=lambda t: (t.values[0], t.values[1], t.number)), True
    return min(trials, key=lambda t: (t.values[1], t.values[0], t.number)), False
