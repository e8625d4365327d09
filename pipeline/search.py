"""A multi-objective search over ablation parameters: fewer refusals, less damage (Optuna).

The search space is ``weighted_ablation``'s (``pipeline.edit``, ``pipeline.interventions``):

* the direction (``sources``): the selected one; the difference-in-means candidate at a fractional
  layer index of the selected position (unit directions of the two neighbouring layers interpolated; the
  ``projected`` variant then uses the harmless mean interpolated the same way); or ``per_layer``, each
  block's writes losing the candidate read where they go (the residual stream after that block; the
  ``projected`` variant makes each orthogonal to the harmless mean there);
* for attention writes and for MLP writes separately, a layer kernel: peak weight, peak position, floor
  weight (as a share of the peak) and width (``pipeline.edit.Kernel``); the embedding is not edited;
* the variant: ``plain`` (hooks), ``projected`` (the direction made orthogonal to the harmless mean
  first), ``norm_preserving`` (the weight edit that keeps each written vector's norm) or
  ``projected_norm_preserving`` (both).

Two objectives, both minimised: the number of refusals among the search's harmful prompts (greedy
completions judged by substring matching, each stopped once a refusal phrase settles its verdict), and
the mean KL divergence (exact, from log-softmax) from the unedited model to the edited one of the
next-token distribution at the end of each harmless prompt, as heretic measures it; with ``kl_tokens``
n > 1, of the first n next-token distributions along the unedited model's greedy answer (fewer where
the answer ends sooner), averaged per prompt. The unedited logits are computed once. A trial never
copies the model: hooks are removed, in-place weight edits undone, when it ends.

The KL is measured first, and a trial's refusals are counted only as far as they can change the front
(``prune_reason``): not at all when its KL is above ``max_kl`` or a complete trial already refused
nothing at no more KL; otherwise generation gives up as soon as the trial has as many refusals as the
best complete trial with no more KL (all harmful prompts are generated together, and refusals show in
their first few tokens). Such trials are pruned, and count against the trial budget.

Trials are asked ``batch_trials`` at a time and measured together: the trials whose edits are hooks run
in shared batches, each hook acting on its own trial's rows, because a decoding step costs a CPU far less
per row over many rows than over a few. Each trial's numbers are what measuring it alone gives; only the
pruning differs, since the trials of a batch are counted against the trials complete before it.

Trials live in Optuna's RDB storage (an SQLite file by default; PostgreSQL or MySQL for several
workers): a killed search resumes the same study and loses at most its running batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import optuna
import sqlalchemy.exc
import torch
from optuna.storages._heartbeat import get_heartbeat_thread

from pipeline.edit import Edit, Kernel
from pipeline.errors import ConfigError
from pipeline.generation import GroupStopper, StopLimitReached, complete_ids, decode
from pipeline.hooks import acting_together, unit
from pipeline.inference import Groups
from pipeline.interventions import apply, get_intervention, orthogonal_to, projected
from pipeline.models.loading import LoadedModel
from pipeline.parego import FINISHED, ParEGOSampler
from pipeline.refusal import is_refusal, kl_divergence

log = logging.getLogger(__name__)

VARIANTS = {"plain": "weighted_ablation", "projected": "weighted_ablation",
            "norm_preserving": "norm_preserving_ablation", "projected_norm_preserving": "norm_preserving_ablation"}
# Variants whose directions are made orthogonal to the harmless mean first (with norm preservation:
# "norm-preserving biprojected abliteration", close to what heretic searches by default).
PROJECTED = ("projected", "projected_norm_preserving")
COMPONENTS = ("attention", "mlp")
SAMPLERS = ("tpe", "nsga2", "parego")
SOURCES = ("selected", "layer", "per_layer")


def interpolated(rows: torch.Tensor, index: float) -> torch.Tensor:
    """``rows`` ``[n_sites, d]`` read at a fractional site ``index`` (linear between the neighbours)."""
    low = int(math.floor(index))
    high = min(low + 1, rows.shape[0] - 1)
    return torch.lerp(rows[low].float(), rows[high].float(), index - low)


def direction_at(candidates: torch.Tensor, index: float) -> torch.Tensor:
    """The unit direction at a fractional layer ``index`` of ``candidates`` ``[n_sites, d]``: the unit
    candidates of the two neighbouring layers, interpolated linearly and normalised."""
    return unit(interpolated(unit(candidates), index))


def suggest(trial: optuna.Trial, n_layers: int, variants: Sequence[str], peak_range: tuple[float, float],
            sources: Sequence[str] = SOURCES, layer_range: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Sample one point of the search space and return it as the edit uses it (``used_params``): the
    fractional layer index within ``layer_range`` as shares of the depth (never the embedding or past the
    last layer), kernel peaks within ``peak_range``.

    Every trial draws the same parameters: with ``layer`` among the sources the layer index is drawn even
    when another source is, because multivariate TPE samples a parameter that only some trials have apart
    from the others."""
    trial.suggest_categorical("source", list(sources))
    if "layer" in sources:
        low, high = max(1.0, layer_range[0] * n_layers), min(float(n_layers - 1), layer_range[1] * n_layers)
        trial.suggest_float("direction_layer", low, max(low, high))
    for part in COMPONENTS:
        trial.suggest_float(f"{part}_peak", *peak_range)
        trial.suggest_float(f"{part}_position", 0.0, float(n_layers - 1))
        trial.suggest_float(f"{part}_floor", 0.0, 1.0)
        trial.suggest_float(f"{part}_width", 1.0, float(n_layers))
    trial.suggest_categorical("variant", list(variants))
    return used_params(trial)


def used_params(trial: optuna.Trial | optuna.trial.FrozenTrial) -> dict:
    """A trial's parameters as its edit uses them: the direction layer only for a ``layer`` source."""
    return {key: value for key, value in trial.params.items()
            if key != "direction_layer" or trial.params["source"] == "layer"}


def paper_params(n_layers: int) -> dict:
    """The paper's edit as nearly as the space holds it: the selected direction ablated at full strength
    from every attention and MLP write (the search never edits the embedding). The stage's first trial,
    so the front starts from the paper's result."""
    full = {"peak": 1.0, "position": 0.0, "floor": 1.0, "width": float(n_layers)}
    return {"source": "selected", **{f"{part}_{key}": value for part in COMPONENTS for key, value in full.items()},
            "variant": "plain"}


def kernel(params: dict, part: str) -> Kernel:
    peak = params[f"{part}_peak"]
    return Kernel(peak, params[f"{part}_position"], params[f"{part}_floor"] * peak, params[f"{part}_width"])


def trial_edit(params: dict, base: Edit, candidates: torch.Tensor,
               harmless_means: torch.Tensor | None = None) -> tuple[Edit, str]:
    """The edit record of one point of the space and the registered intervention that applies it.

    ``candidates`` ``[n_layers + 1, d]`` are the difference-in-means candidates at the selected position, one
    per residual site (0: the embedding's output), and ``harmless_means`` (optional, same shape) the harmless
    means they were read against: a direction taken at a fractional layer is projected off the harmless mean
    at that layer, and a per-layer direction off the mean where it is read, not the selected layer's.
    """
    harmless_mean, per_layer = base.harmless_mean, params["source"] == "per_layer"
    after_blocks = slice(1, base.n_layers + 1)  # block l's writes enter site l + 1
    if params["source"] == "selected":
        directions = unit(base.direction)[None]
    elif per_layer:
        directions = unit(candidates[after_blocks])
        if harmless_means is not None:
            harmless_mean = harmless_means[base.layer].float()
    else:
        directions = direction_at(candidates, params["direction_layer"])[None]
        if harmless_means is not None:
            harmless_mean = interpolated(harmless_means, params["direction_layer"])
    edit = Edit(directions, base.layer, base.n_layers,
                kernel(params, "attention").weights(base.n_layers), kernel(params, "mlp").weights(base.n_layers),
                embedding_weight=0.0, per_layer=per_layer, harmless_mean=harmless_mean,
                addition_layer=base.addition_layer, addition_coeff=base.addition_coeff, position=base.position,
                position_label=base.position_label)
    if params["variant"] in PROJECTED and per_layer and harmless_means is not None:
        edit = edit.with_directions(orthogonal_to(directions, harmless_means[after_blocks]))  # each off its own site
    elif params["variant"] in PROJECTED:
        edit = projected(edit)
    return edit, VARIANTS[params["variant"]]


Measured = tuple[int | None, float, str | None]  # (refusals, KL, why the refusals were not counted)


@dataclass
class HarmlessReference:
    """The harmless prompts the KL objective reads and the unedited model's logits on them, computed once.

    Each row of ``ids`` is a harmless prompt followed by the first ``kl_tokens - 1`` tokens of the
    unedited model's greedy answer; ``logits`` ``[n, kl_tokens, vocab]`` are the unedited next-token
    logits at the last ``kl_tokens`` positions and ``counts`` how many of those belong to each row's
    answer (fewer where the answer ended sooner).
    """

    ids: list[list[int]]
    logits: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def of(cls, lm: LoadedModel, prompts: list[list[int]], kl_tokens: int, batch_size: int) -> HarmlessReference:
        if kl_tokens < 1:
            raise ValueError(f"kl_tokens={kl_tokens}: the KL needs at least the first token")
        answers = [[] for _ in prompts] if kl_tokens == 1 else lm.runner(batch_size, progress=False).generate(
            prompts, lm.chat.prefix_ids, kl_tokens - 1, lm.eos_ids, desc="search: harmless answers")
        ids = [p + a for p, a in zip(prompts, answers)]
        counts = torch.tensor([len(a) + 1 for a in answers])
        return cls(ids, tail_logits(lm, ids, kl_tokens, batch_size), counts)

    def kl(self, logits: torch.Tensor) -> float:
        """Mean over prompts of each prompt's mean KL over its answer positions."""
        per_position = kl_divergence(self.logits, logits, eps=0.0)  # [n, kl_tokens]
        kept = torch.arange(per_position.shape[1]) >= per_position.shape[1] - self.counts[:, None]
        return float((per_position.where(kept, 0.0).sum(dim=1) / self.counts).mean())


def tail_logits(lm: LoadedModel, ids: list[list[int]], n: int, batch_size: int) -> torch.Tensor:
    """Next-token logits at the last ``n`` positions of each row, ``[rows, n, vocab]``."""
    return lm.runner(batch_size, progress=False).tail_logits(ids, lm.chat.prefix_ids, n)


@dataclass
class Objective:
    """Refusals on harmful prompts and KL on harmless ones, for one trial's parameters."""

    lm: LoadedModel
    base: Edit
    candidates: torch.Tensor
    harmful: list[str]
    harmless: HarmlessReference
    refusal_substrings: list[str]
    max_new_tokens: int
    batch_size: int
    variants: tuple[str, ...]
    peak_range: tuple[float, float]  # kernel peak weights are searched within it
    sources: tuple[str, ...] = SOURCES
    harmless_means: torch.Tensor | None = None  # [n_sites, d] at the candidates' position
    layer_range: tuple[float, float] = (0.0, 1.0)  # the fractional direction layer's range, as shares of depth
    max_kl: float = math.inf  # a trial whose KL exceeds this is pruned before its refusals are counted
    prune_dominated: bool = True  # also prune a trial once a complete one is no worse on both objectives

    harmful_ids: list[list[int]] = field(init=False)  # the harmful prompts, encoded once

    def __post_init__(self) -> None:
        low, high = self.peak_range
        if not 0.0 <= low <= high:
            raise ConfigError(f"search.peak_range={list(self.peak_range)}",
                              "give [low, high] with 0 <= low <= high, e.g. [0.5, 1.5]")
        self.harmful_ids = self.lm.encode(self.harmful)

    def suggest(self, trial: optuna.Trial) -> dict:
        """One point of this search's space for ``trial`` (``suggest``)."""
        return suggest(trial, self.base.n_layers, self.variants, self.peak_range, self.sources, self.layer_range)

    def measure(self, edit: Edit, name: str,
                rivals: Sequence[optuna.trial.FrozenTrial] | None = None) -> Measured:
        """(refusals, mean KL, why refusals were not counted) of intervention ``name`` with ``edit``.

        The KL is measured first. With ``rivals`` (complete trials) the refusals are counted only as far
        as they can change the front (``prune_reason``): not at all above ``max_kl`` or when a rival
        refused nothing at no more KL, and only until they reach the fewest of a rival with no more KL.
        """
        n = self.harmless.logits.shape[1]
        with apply(self.lm, name, edit):
            kl = self.harmless.kl(tail_logits(self.lm, self.harmless.ids, n, self.batch_size))
            if rivals is None:
                return self.refusals(), kl, None
            limit, reason = prune_reason(kl, self.max_kl, rivals)
            if limit == 0:
                return None, kl, reason
            try:
                return self.refusals(limit), kl, None
            except StopLimitReached:
                return None, kl, gave_up(limit, reason)

    def measure_all(self, points: Sequence[tuple[Edit, str]],
                    rivals: Sequence[optuna.trial.FrozenTrial]) -> list[Measured]:
        """``measure`` for several trials' (edit, intervention) at once, each counted against the same
        ``rivals``. Trials whose intervention is hooks share batches, each hook acting on its own trial's rows:
        on a CPU a decoding step over 96 rows costs about half as much per row as one over 24. A weight edit
        changes the model for every row, so its trial is measured alone."""
        shared = [i for i, (_, name) in enumerate(points) if get_intervention(name).hooks is not None]
        if len(shared) < 2:
            shared = []
        results = {i: self.measure(*point, rivals) for i, point in enumerate(points) if i not in shared}
        if shared:
            results.update(zip(shared, self._measure_together([points[i] for i in shared], rivals)))
        return [results[i] for i in range(len(points))]

    def _measure_together(self, points: Sequence[tuple[Edit, str]],
                          rivals: Sequence[optuna.trial.FrozenTrial]) -> list[Measured]:
        """``measure_all`` for hook trials: every trial's KL in shared batches, then the refusals of those
        worth counting, generated together; a trial stops generating once it reaches its own limit."""
        runner = self.lm.runner(self.batch_size, progress=False)
        prefix, harmless, harmful = self.lm.chat.prefix_ids, self.harmless.ids, self.harmful_ids
        with acting_together([partial(apply, self.lm, name, edit) for edit, name in points]) as rows:
            logits = runner.tail_logits(harmless * len(points), prefix, self.harmless.logits.shape[1],
                                        groups=Groups(_group_of(range(len(points)), len(harmless)), rows.track))
            kls = [self.harmless.kl(part) for part in logits.split(len(harmless))]
            limits, reasons = zip(*(prune_reason(kl, self.max_kl, rivals) for kl in kls))
            counted = [g for g, limit in enumerate(limits) if limit != 0]
            of = _group_of(counted, len(harmful))
            stop = GroupStopper(self.lm, self.refusal_substrings, limits, of)
            tokens = runner.generate(harmful * len(counted), prefix, self.max_new_tokens, self.lm.eos_ids,
                                     stop=stop, groups=Groups(of, rows.track)) if counted else []
        results: list[Measured] = [(None, kl, reason) for kl, reason in zip(kls, reasons)]  # limit 0: not counted
        for g, completions in zip(counted, [tokens[i:i + len(harmful)] for i in range(0, len(tokens), len(harmful))]):
            if stop.given_up(g):
                results[g] = (None, kls[g], gave_up(limits[g], reasons[g]))
            else:
                results[g] = (sum(is_refusal(decode(self.lm, t), self.refusal_substrings) for t in completions),
                              kls[g], None)
        return results

    def refusals(self, limit: int | None = None) -> int:
        """Refusals among the harmful prompts under whatever intervention is active; generation gives up
        (``StopLimitReached``) once ``limit`` completions are refusals."""
        texts = complete_ids(self.lm, self.harmful_ids, self.max_new_tokens, self.batch_size, "search: harmful",
                             stop_at=self.refusal_substrings, stop_limit=limit)
        return sum(is_refusal(t, self.refusal_substrings) for t in texts)

    def run(self, study: optuna.Study, proposed: Sequence[tuple[optuna.Trial, dict]]) -> tuple[list[Measured], float]:
        """Measure trials asked together (each with its ``suggest``-ed parameters): each one's ``Measured``
        and its share of the batch's seconds. Nothing is written to the study (see ``record``)."""
        start = time.perf_counter()
        points = [trial_edit(params, self.base, self.candidates, self.harmless_means) for _, params in proposed]
        results = self.measure_all(points, completed(study) if self.prune_dominated else [])
        return results, (time.perf_counter() - start) / len(proposed)


def record(study: optuna.Study, trial: optuna.Trial, params: dict, measured: Measured, seconds: float) -> None:
    """Tell ``study`` a measured trial's result: its objectives, or that it was pruned and why (with its KL and
    seconds either way)."""
    refusals, kl, reason = measured
    trial.set_user_attr("seconds", round(seconds, 2))
    trial.set_user_attr("kl", kl)
    if reason is None:
        log.info("trial %d: %d refusals, KL %.4f (%s)", trial.number, refusals, kl, params["variant"])
        study.tell(trial, [refusals, kl])
    else:
        trial.set_user_attr("pruned", reason)
        log.info("trial %d pruned: %s", trial.number, reason)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)


def _group_of(groups: Sequence[int], rows_each: int) -> list[int]:
    """The group of each row when ``rows_each`` rows of every group in ``groups`` follow one another."""
    return [g for g in groups for _ in range(rows_each)]


def prune_reason(kl: float, max_kl: float, rivals: Sequence[optuna.trial.FrozenTrial]) -> tuple[int | None, str | None]:
    """How many refusals a trial with this KL may count before counting more cannot change the front, and
    why: none above ``max_kl`` (no use whatever it refuses); otherwise the fewest refused by a rival at no
    more KL (reaching them, this trial is no better on either objective), or None without such a rival."""
    if kl > max_kl:
        return 0, f"KL {kl:.4f} above max_kl {max_kl}"
    beaten = [t for t in rivals if t.values[1] <= kl]
    if not beaten:
        return None, None
    best = min(beaten, key=lambda t: (t.values[0], t.values[1], t.number))
    return int(best.values[0]), (f"KL {kl:.4f} not below trial {best.number}'s {best.values[1]:.4f} with "
                                 f"{int(best.values[0])} refusals")


def gave_up(limit: int, reason: str) -> str:
    """Why a trial's generation stopped at ``limit`` refusals (``prune_reason``'s ``reason`` for that limit)."""
    return f"{limit}+ refusals: {reason}"


def sampler(name: str, seed: int, startup_trials: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "parego":
        return ParEGOSampler(seed, startup_trials)
    raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")


def storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats: a trial whose worker died is marked failed once its heartbeat is stale.

    Workers that start together on a fresh database race to create Optuna's schema; the loser's insert
    of the schema version fails although the schema is then complete, so it tries again (up to
    ``attempts`` times in all; the last failure is raised)."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9; we rely on them knowingly
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90, engine_kwargs=engine)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as error:
            if attempt == attempts:
                raise
            log.warning("creating the study storage collided with another worker (%s); trying again", error.orig)
            time.sleep(0.2 * attempt)


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count against the budget: complete ones and those pruned for their KL."""
    return study.get_trials(deepcopy=False, states=FINISHED)


@contextlib.contextmanager
def heartbeats(study: optuna.Study, trials: Sequence[optuna.Trial]) -> Iterator[None]:
    """Heartbeats for trials asked with ``study.ask`` (only ``study.optimize`` records them itself), so a
    worker killed mid-batch leaves trials that ``fail_stale_trials`` fails; Optuna's own thread, one per trial."""
    with contextlib.ExitStack() as stack:
        for trial in trials:
            stack.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
        yield


def optimize(study: optuna.Study, objective: Objective, n_trials: int, batch_trials: int = 1) -> int:
    """Run trials until the study holds ``n_trials`` finished ones (complete or pruned, counting every
    worker's); returns how many this call ran. A re-run after a kill only runs the missing ones.

    Trials are asked ``batch_trials`` at a time and measured together (``Objective.measure_all``); TPE's
    constant liar keeps the trials of a batch apart (ParEGO's: their different weights). A kill loses the
    running batch, nothing finished."""
    if not (isinstance(batch_trials, int) and batch_trials >= 1):
        raise ConfigError(f"search.batch_trials={batch_trials!r}", "use a positive number of trials (1: one at a time)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    ran = 0
    while (missing := n_trials - len(finished(study))) > 0:
        proposed = []
        for _ in range(min(batch_trials, missing)):  # asked one after the other: each sees the others pending
            with warnings.catch_warnings():  # heartbeats are recorded below (`heartbeats`), as study.optimize does
                warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
                trial = study.ask()
            proposed.append((trial, objective.suggest(trial)))
        trials = [trial for trial, _ in proposed]
        try:
            with heartbeats(study, trials):  # only while measuring; the results are written after
                results, seconds = objective.run(study, proposed)
        except BaseException:
            for trial in trials:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        for (trial, params), measured in zip(proposed, results):
            record(study, trial, params, measured, seconds)
        ran += len(trials)
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
