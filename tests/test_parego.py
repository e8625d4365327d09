"""ParEGO: every trial proposed for its own trade-off between refusals and KL, so a short search reaches both
ends of the front."""

import numpy as np
import optuna
import pytest

from pipeline import parego, search


def test_every_four_successive_trials_aim_at_both_halves_of_the_front():
    for start in range(200):
        weights = [parego.weight(n) for n in range(start, start + 4)]
        assert all(0.0 <= w < 1.0 for w in weights)
        assert min(weights) < 0.5 <= max(weights)


def test_a_weight_near_one_ranks_the_fewest_refusals_first_and_near_zero_the_lowest_kl():
    values = np.array([[0, 0.04], [1, 0.012], [6, 0.002], [0, 0.05], [15, 1e-9]])
    points = parego.scaled(values)
    assert points.min() == 0.0 and points.max() == 1.0
    assert np.argmin(parego.chebyshev(points, 0.99)) == 0  # no refusals, and of those the lower KL
    assert np.argmin(parego.chebyshev(points, 0.01)) == 4  # an edit that changes nothing
    middle = parego.chebyshev(points, 0.5)
    assert np.argmin(middle) in (1, 2) and middle[3] > middle[0]  # a dominated point never ranks above its rival


def toy_values(strength: float) -> list[float]:
    """Refusals fall and KL rises with the edit's strength."""
    return [float(round(15 * (1 - strength))), 0.05 * strength**2]


def toy(trial: optuna.Trial) -> list[float]:
    return toy_values(trial.suggest_float("strength", 0.0, 1.0))


def test_the_start_up_trials_are_the_random_draws_tpe_makes_with_the_same_seed():
    studies = [optuna.create_study(directions=["minimize", "minimize"], sampler=s)
               for s in (parego.ParEGOSampler(3, 6), optuna.samplers.TPESampler(seed=3, n_startup_trials=6))]
    for study in studies:
        study.optimize(toy, n_trials=6)
    assert [t.params for t in studies[0].trials] == [t.params for t in studies[1].trials]


@pytest.mark.parametrize(("refusal_weight", "low", "high"), [(0.98, 0.8, 1.0), (0.02, 0.0, 0.2)])
def test_a_trial_weighted_toward_one_objective_is_proposed_near_the_trials_best_at_it(
        monkeypatch, refusal_weight, low, high):
    monkeypatch.setattr(parego, "weight", lambda number: refusal_weight)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=search.sampler("parego", 0, 6))
    space = {"strength": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study.add_trials([optuna.trial.create_trial(params={"strength": x}, distributions=space, values=toy_values(x))
                      for x in np.linspace(0.0, 1.0, 21)])
    proposals = [study.ask(space).params["strength"] for _ in range(15)]
    assert low <= np.median(proposals) <= high  # strongest edits toward no refusals, lightest toward no KL
