"""The ablation-parameter search: its space, its front, and a study that survives kills and shares workers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from conftest import make_tiny_project, run_stages, subprocess_env
from pipeline import search
from pipeline.edit import Edit, read_edit

TINY_SEARCH = {"search.n_trials": 5, "search.startup_trials": 3, "search.max_new_tokens": 3}


def test_fractional_layer_interpolates_the_neighbouring_unit_directions():
    candidates = torch.tensor([[1.0, 0.0], [0.0, 5.0], [3.0, 0.0]])
    torch.testing.assert_close(search.direction_at(candidates, 1.0), torch.tensor([0.0, 1.0]))
    half = search.direction_at(candidates, 0.5)
    torch.testing.assert_close(half, torch.tensor([1.0, 1.0]) / 2 ** 0.5)
    torch.testing.assert_close(search.direction_at(candidates, 2.0), torch.tensor([1.0, 0.0]))


def test_a_trial_is_a_weighted_ablation_edit_with_its_kernels():
    base = Edit.of(torch.randn(8), 2, 4, position=-1, harmless_mean=torch.randn(8))
    params = {"source": "selected", "variant": "projected", "attention_peak": 1.2, "attention_position": 1.0,
              "attention_floor": 0.5, "attention_width": 2.0, "mlp_peak": 0.0, "mlp_position": 0.0,
              "mlp_floor": 1.0, "mlp_width": 4.0}
    edit, name = search.trial_edit(params, base, torch.randn(5, 8))
    assert name == "weighted_ablation" and edit.embedding_weight == 0.0
    torch.testing.assert_close(edit.attention_weights, torch.tensor([0.9, 1.2, 0.9, 0.6]))
    assert edit.mlp_weights.abs().sum() == 0
    assert abs(float(edit.direction @ base.harmless_mean)) < 1e-5  # projected off the harmless mean
    assert search.trial_edit({**params, "variant": "norm_preserving"}, base, torch.randn(5, 8))[1] == \
        "norm_preserving_ablation"


def test_pareto_front_and_hypervolume():
    points = [(3, 0.1), (1, 0.5), (2, 0.2), (2, 0.6), (0, 2.0)]
    assert search.pareto(points) == [0, 1, 2, 4]
    # reference (4 refusals, KL 1): (0, 2.0) lies beyond it and adds nothing
    assert search.hypervolume(points, (4, 1.0)) == pytest.approx(3 * 0.5 + 2 * 0.3 + 1 * 0.1)  # a staircase
    assert search.hypervolume([], (4, 1.0)) == 0


def test_the_chosen_trial_has_the_fewest_refusals_within_the_kl_budget():
    trials = [_frozen(0, 5, 0.01), _frozen(1, 1, 0.3), _frozen(2, 2, 0.15), _frozen(3, 2, 0.1)]
    chosen, within = search.choose(trials, kl_budget=0.2)
    assert (chosen.number, within) == (3, True)
    chosen, within = search.choose(trials, kl_budget=0.001)
    assert (chosen.number, within) == (0, False)


def _frozen(number, refusals, kl):
    t = optuna.trial.create_trial(values=[refusals, kl])
    t.number = number
    return t


@pytest.fixture
def selected(tmp_path):
    """A tiny project with data..select run (the search's inputs)."""
    project = make_tiny_project(tmp_path)
    run_stages(project, "data", "filter", "activations", "directions", "select")
    return project


def _search_overrides(**extra) -> dict:
    from pipeline.config import compose_config

    settings = {f"search.{k}": v for k, v in compose_config(["search=optuna"]).search.items()}
    return {k: json.dumps(v if not hasattr(v, "_content") else list(v)) for k, v in
            {**settings, **TINY_SEARCH, **extra}.items()}


def test_search_writes_its_front_the_chosen_edit_and_resumes_without_repeating_trials(selected):
    run_stages(selected, "search", **_search_overrides())
    metrics = json.loads((selected / "metrics" / "search.json").read_text())
    assert metrics["n_trials"] == 5 and metrics["trials_this_run"] == 5
    trials = pd.read_csv(selected / "artifacts" / "search" / "trials.csv")
    assert len(trials) == 5 and trials.pareto.any() and set(trials.variant) <= {"plain", "projected",
                                                                               "norm_preserving"}
    assert (selected / "plots" / "search" / "pareto.png").exists()
    assert 0 <= metrics["hypervolume"] <= metrics["hypervolume_reference"]["refusals"]
    here = os.getcwd()
    os.chdir(selected)
    try:
        edit = read_edit("search")
    finally:
        os.chdir(here)
    assert edit.provenance["trial"] == metrics["chosen"]["trial"] and edit.embedding_weight == 0.0
    # asking for more trials runs only the missing ones, in the same study; another sampler seed starts anew
    run_stages(selected, "search", **_search_overrides(**{"search.n_trials": 7}))
    again = json.loads((selected / "metrics" / "search.json").read_text())
    assert (again["study"], again["n_trials"], again["trials_this_run"]) == (metrics["study"], 7, 2)
    run_stages(selected, "search", **_search_overrides(**{"search.n_trials": 7, "search.seed": 1}))
    other = json.loads((selected / "metrics" / "search.json").read_text())
    assert other["study"] != metrics["study"] and other["trials_this_run"] == 7


def test_the_evaluation_stages_read_the_chosen_trial_with_eval_edit_search(selected):
    overrides = _search_overrides()
    run_stages(selected, "search", **overrides)
    run_stages(selected, "completions", "refusal", "orthogonalize", **overrides, **{"eval.edit": "search"})
    assert json.loads((selected / "metrics" / "refusal.json").read_text())["refusal_rate"]
    chosen = json.loads((selected / "metrics" / "search.json").read_text())["chosen"]
    ortho = json.loads((selected / "metrics" / "orthogonalize.json").read_text())
    assert ortho["intervention"] == chosen["intervention"]  # orthogonalize.intervention=auto folds the trial's


def test_search_off_writes_only_that_it_is_off(selected):
    run_stages(selected, "search")
    assert json.loads((selected / "metrics" / "search.json").read_text()) == {"enabled": False}
    assert not (selected / "artifacts" / "search" / "edit.json").exists()


def _worker(project: Path, env: dict, **overrides) -> subprocess.Popen:
    code = ("import sys; from pipeline.config import load_params; from pipeline.stages.search import work; "
            "work(load_params(overrides=sys.argv[1:]))")
    args = [f"{k}={v}" for k, v in _search_overrides(**overrides).items()]
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _trials(project: Path, overrides: dict) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{project / 'artifacts' / 'search' / 'study.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


@pytest.mark.slow
def test_two_workers_on_one_storage_record_every_trial_once(selected, tmp_path):
    env = subprocess_env(tmp_path, OMP_NUM_THREADS="1", PYTHONPATH=str(selected))
    overrides = {"search.n_trials": 8, "search.storage": f"sqlite:///{selected / 'artifacts' / 'search' / 'study.db'}"}
    (selected / "artifacts" / "search").mkdir(parents=True, exist_ok=True)
    workers = [_worker(selected, env, **overrides) for _ in range(2)]
    for w in workers:
        assert w.wait(timeout=600) == 0, w.stderr.read()[-3000:]
    trials = _trials(selected, overrides)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 8 <= len(complete) <= 9  # each worker stops once the study holds 8; both may finish one at the end
    assert len({t.number for t in trials}) == len(trials)  # every trial recorded once
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)  # none lost


@pytest.mark.slow
def test_a_killed_search_resumes_and_loses_at_most_the_running_trial(selected, tmp_path):
    env = subprocess_env(tmp_path, OMP_NUM_THREADS="1", PYTHONPATH=str(selected))
    overrides = {"search.n_trials": 40}
    worker = _worker(selected, env, **overrides)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until some trials are complete, then kill mid-trial
        db = selected / "artifacts" / "search" / "study.db"
        if db.exists() and optuna.get_all_study_summaries(f"sqlite:///{db}"):
            done = [t for t in _trials(selected, overrides) if t.state == optuna.trial.TrialState.COMPLETE]
            if len(done) >= 3:
                break
        time.sleep(0.5)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = _trials(selected, overrides)
    finished = [t for t in before if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(before) - len(finished) <= 1  # at most the running trial is unfinished
    run_stages(selected, "search", **_search_overrides(**overrides))
    metrics = json.loads((selected / "metrics" / "search.json").read_text())
    assert metrics["n_trials"] == 40
    assert metrics["trials_this_run"] == 40 - len(finished)  # the finished ones were kept, not rerun
