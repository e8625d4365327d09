"""ParEGO with Optuna's TPE: each trial is proposed for its own trade-off between the two objectives.

Why: Optuna's multi-objective TPE keeps only ceil(0.1 n) finished trials as its "good" set (one or two in a
20-trial search) and picks them among the front by a hypervolume tie-break that favours the middle of the
front. A short search then refines one or two front points and leaves both ends (the cheapest edit that
removes every refusal, the weakest edits) where the random start-up left them. ParEGO (Knowles 2006,
"ParEGO: a hybrid algorithm with on-line landscape approximation for expensive multiobjective optimization
problems") instead gives every trial a weight between the objectives and ranks the complete trials by the
augmented Chebyshev scalarisation for that weight; single-objective multivariate TPE proposes from that
ranking. The weights of successive trials follow the golden-ratio sequence, so the trials of any batch point
at different parts of the front (pending trials are not shown to TPE: the weights keep a batch apart).
Refusals and log KL are each scaled to [0, 1] over the complete trials (KL spans orders of magnitude along a
front). Pruned trials are handed to TPE as pruned, which ranks them below every complete trial, as
multi-objective TPE does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that count against a study's budget
RHO = 0.05  # the augmented term: among points tied on the Chebyshev term, the better sum ranks first
KL_FLOOR = 1e-6  # log KL of an edit that changes nothing


def weight(number: int) -> float:
    """The refusals' weight for trial ``number`` (the KL's is 1 minus it): the golden-ratio sequence from 0.5,
    so any few successive trials spread over (0, 1)."""
    return (0.5 + number * GOLDEN) % 1.0


def scaled(values: np.ndarray) -> np.ndarray:
    """``values`` ``[n, 2]`` (refusals, KL) as (refusals, log KL), each scaled to [0, 1] over the rows."""
    points = np.column_stack([values[:, 0], np.log(np.maximum(values[:, 1], KL_FLOOR))])
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - low) / np.where(high > low, high - low, 1.0)


def chebyshev(points: np.ndarray, refusal_weight: float) -> np.ndarray:
    """The augmented Chebyshev scalarisation of scaled ``points`` ``[n, 2]`` (lower is better)."""
    weighted = points * np.array([refusal_weight, 1.0 - refusal_weight])
    return weighted.max(axis=1) + RHO * weighted.sum(axis=1)


class ParEGOSampler(optuna.samplers.BaseSampler):
    """Multivariate TPE on trial ``t``'s scalarisation (``weight(t)``) of a two-objective study's trials;
    ``startup_trials`` random trials first (the same draws as ``TPESampler`` with the same seed)."""

    def __init__(self, seed: int, startup_trials: int) -> None:
        self._seed, self._startup_trials = seed, startup_trials
        self._random = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return optuna.search_space.intersection_search_space(
            study.get_trials(deepcopy=False, states=FINISHED), include_pruned=True)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        trials = study.get_trials(deepcopy=False, states=FINISHED)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not search_space or len(trials) < self._startup_trials or not complete:
            return {}
        values = chebyshev(scaled(np.array([t.values for t in complete])), weight(trial.number))
        verbosity = optuna.logging.get_verbosity()  # Optuna logs every study it creates: this one is no news
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            scalar = optuna.create_study(sampler=optuna.samplers.TPESampler(
                seed=self._seed * 1_000_003 + trial.number, n_startup_trials=0, multivariate=True))
        finally:
            optuna.logging.set_verbosity(verbosity)

        def with_outcome(t: FrozenTrial, **outcome: Any) -> FrozenTrial:  # t's parameters in the scalar study
            return optuna.trial.create_trial(params={name: t.params[name] for name in search_space},
                                             distributions=search_space, **outcome)

        scalar.add_trials([with_outcome(t, value=float(v)) for t, v in zip(complete, values)]
                          + [with_outcome(t, state=TrialState.PRUNED) for t in trials if t.state == TrialState.PRUNED])
        return scalar.ask(search_space).params

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)
