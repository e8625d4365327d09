"""The ablation-parameter search: its space, its front, and a study that survives kills and shares workers."""

import json
import os
import re
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
from pipeline.errors import ConfigError, PipelineError
from pipeline.generation import GroupStopper, complete
from pipeline.interventions import check_names
from pipeline.refusal import is_refusal, kl_divergence

# No pruning (a random tiny model refuses nothing, so every trial after the first would be dominated, and
# its KL can be large): these tests count complete trials. Pruning has its own tests.
TINY_SEARCH = {"search.n_trials": 5, "search.startup_trials": 3, "search.max_new_tokens": 3, "search.max_kl": 1e9,
               "search.prune_dominated": False}


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
    both, name = search.trial_edit({**params, "variant": "projected_norm_preserving"}, base, torch.randn(5, 8))
    assert name == "norm_preserving_ablation"
    torch.testing.assert_close(both.direction, edit.direction)  # the projected direction, its norm kept


def test_a_direction_from_a_fractional_layer_is_projected_off_that_layers_harmless_mean():
    base = Edit.of(torch.randn(8), 2, 4, position=-1, harmless_mean=torch.randn(8))
    harmless_means = torch.randn(5, 8)
    params = {"source": "layer", "direction_layer": 2.5, "variant": "projected", "attention_peak": 1.0,
              "attention_position": 1.0, "attention_floor": 1.0, "attention_width": 4.0, "mlp_peak": 1.0,
              "mlp_position": 1.0, "mlp_floor": 1.0, "mlp_width": 4.0}
    edit, _ = search.trial_edit(params, base, torch.randn(5, 8), harmless_means)
    torch.testing.assert_close(edit.harmless_mean, (harmless_means[2] + harmless_means[3]) / 2)
    assert abs(float(edit.direction @ edit.harmless_mean)) < 1e-5


def test_a_per_layer_trial_cleans_each_blocks_writes_of_the_direction_read_after_that_block():
    """Block l's writes enter the residual stream read at site l + 1: that site's candidate is the one they lose
    (site 0 is the embedding's output, which no block writes); projected, each is made orthogonal to the
    harmless mean at its own site. The record's direction (for addition and readouts) is the selected layer's."""
    base = Edit.of(torch.randn(8), 2, 4, position=-1, harmless_mean=torch.randn(8))
    candidates, harmless_means = torch.randn(5, 8), torch.randn(5, 8)
    params = {"source": "per_layer", "variant": "plain", "attention_peak": 1.0, "attention_position": 1.0,
              "attention_floor": 1.0, "attention_width": 4.0, "mlp_peak": 1.0, "mlp_position": 1.0,
              "mlp_floor": 1.0, "mlp_width": 4.0}
    edit, name = search.trial_edit(params, base, candidates, harmless_means)
    assert name == "weighted_ablation" and edit.per_layer and edit.directions.shape == (4, 8)
    edit.validate()
    unit = candidates / candidates.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(edit.directions, unit[1:])
    torch.testing.assert_close(edit.direction, unit[2])  # read at the selected layer 2: block 1's writes
    torch.testing.assert_close(edit.harmless_mean, harmless_means[2])
    projected, _ = search.trial_edit({**params, "variant": "projected"}, base, candidates, harmless_means)
    cosines = torch.nn.functional.cosine_similarity(projected.directions, harmless_means[1:], dim=-1)
    assert cosines.abs().max() < 1e-5
    assert not torch.allclose(projected.directions, edit.directions)


def test_per_layer_directions_are_read_after_a_block():
    with pytest.raises(ConfigError, match="read after a block"):
        Edit(torch.randn(4, 8), 0, 4, torch.ones(4), torch.ones(4), per_layer=True).validate()


def test_the_direction_layer_stays_within_its_share_of_the_depth():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    layers = [search.suggest(study.ask(), 20, ["plain"], (0.0, 1.0), ("layer",), (0.25, 0.75))["direction_layer"]
              for _ in range(200)]
    assert 5.0 <= min(layers) < 6.0 and 14.0 < max(layers) <= 15.0


def test_every_trial_draws_the_same_parameters_and_only_layer_sources_use_the_direction_layer():
    # a parameter only some trials have would be sampled apart from the others by multivariate TPE
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trials = [study.ask() for _ in range(40)]
    drawn = [search.suggest(trial, 20, ["plain"], (0.0, 1.0), ("layer", "per_layer")) for trial in trials]
    assert {frozenset(trial.params) for trial in trials} == {frozenset(trials[0].params)}
    assert "direction_layer" in trials[0].params
    assert {params["source"] for params in drawn} == {"layer", "per_layer"}
    assert all(("direction_layer" in params) == (params["source"] == "layer") for params in drawn)
    assert [search.used_params(trial) for trial in trials] == drawn  # what the trial table and edit record show


def test_kernel_peaks_stay_within_the_configured_range_and_a_reversed_range_says_what_to_give(tiny_lm):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    peaks = [value for _ in range(100)
             for key, value in search.suggest(study.ask(), 20, ["plain"], (0.5, 1.5)).items() if key.endswith("_peak")]
    assert 0.5 <= min(peaks) < 0.6 and 1.4 < max(peaks) <= 1.5
    lm = tiny_lm("qwen2")
    harmless = search.HarmlessReference.of(lm, lm.encode(["Name a colour."]), 1, 4)
    base = Edit.of(torch.zeros(lm.d_model), 1, lm.n_layers, position=-1)
    with pytest.raises(ConfigError, match=r"0 <= low <= high"):
        search.Objective(lm, base, torch.zeros(lm.n_layers + 1, lm.d_model), ["Name a fruit."], harmless, ["no"],
                         6, 4, ("plain",), (1.5, 0.5))


def test_exact_kl_is_the_log_softmax_divergence_heretic_reports():
    reference, other = torch.randn(6, 50) * 3, torch.randn(6, 50) * 3
    expected = torch.nn.functional.kl_div(other.log_softmax(-1), reference.log_softmax(-1), reduction="none",
                                          log_target=True).sum(-1)
    torch.testing.assert_close(kl_divergence(reference, other, eps=0.0), expected.double(), atol=1e-6, rtol=1e-6)
    assert float(kl_divergence(reference, reference, eps=0.0).abs().max()) < 1e-12


def test_kl_over_the_first_tokens_reads_only_each_answers_positions():
    reference = torch.randn(2, 3, 10)
    counts = torch.tensor([3, 1])  # the second prompt's answer ended at once: only its last position counts
    harmless = search.HarmlessReference([[1, 2, 3], [4, 5, 6]], reference, counts)
    other = reference.clone()
    other[1, :2] = float("nan")  # padding's logits, say: outside the answer, never read
    assert harmless.kl(other) == 0.0
    other[0, 0] += torch.randn(10)
    expected = float(kl_divergence(reference[0, 0], other[0, 0], eps=0.0)) / 3 / 2
    assert harmless.kl(other) == pytest.approx(expected)


def test_the_harmless_reference_follows_the_unedited_greedy_answer(tiny_lm):
    lm = tiny_lm("qwen2")
    prompts = lm.encode(["Name a fruit.", "Write a haiku about autumn leaves falling slowly in the park."])
    first = search.HarmlessReference.of(lm, prompts, 1, 4)
    last = lm.runner(4, progress=False).last_logits(prompts, lm.chat.prefix_ids)
    torch.testing.assert_close(first.logits[:, 0], last)
    reference = search.HarmlessReference.of(lm, prompts, 3, 4)
    assert reference.logits.shape[:2] == (2, 3) and all(1 <= c <= 3 for c in reference.counts.tolist())
    for row, (ids, prompt, count) in enumerate(zip(reference.ids, prompts, reference.counts.tolist())):
        assert ids[: len(prompt)] == prompt and len(ids) == len(prompt) + count - 1
        with torch.inference_mode():
            full = lm.model(torch.tensor([ids])).logits[0, -3:].float()
        torch.testing.assert_close(reference.logits[row], full, atol=1e-4, rtol=1e-4)
    assert reference.kl(reference.logits) == pytest.approx(0.0, abs=1e-9)


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


def search_edit(project: Path) -> Edit:
    """The chosen trial's edit record in ``project`` (read_edit reads from the working directory)."""
    here = os.getcwd()
    os.chdir(project)
    try:
        return read_edit("search")
    finally:
        os.chdir(here)


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
    first = trials[trials.trial == 0].iloc[0]  # the search starts from the paper's edit: full ablation
    assert (first.source, first.variant, first.attention_peak, first.mlp_floor) == ("selected", "plain", 1.0, 1.0)
    assert 0 <= metrics["hypervolume"] <= metrics["hypervolume_reference"]["refusals"]
    edit = search_edit(selected)
    assert edit.provenance["trial"] == metrics["chosen"]["trial"] and edit.embedding_weight == 0.0
    assert first.attention_width == first.mlp_width == edit.n_layers  # the paper's edit reaches every layer
    # asking for more trials runs only the missing ones, in the same study; another sampler seed starts anew
    run_stages(selected, "search", **_search_overrides(**{"search.n_trials": 7}))
    again = json.loads((selected / "metrics" / "search.json").read_text())
    assert (again["study"], again["n_trials"], again["trials_this_run"]) == (metrics["study"], 7, 2)
    run_stages(selected, "search", **_search_overrides(**{"search.n_trials": 7, "search.seed": 1}))
    other = json.loads((selected / "metrics" / "search.json").read_text())
    assert other["study"] != metrics["study"] and other["trials_this_run"] == 7


def test_the_parego_sampler_runs_the_search_stage_and_resumes_its_study(selected):
    run_stages(selected, "search", **_search_overrides(**{"search.sampler": "parego"}))
    first = json.loads((selected / "metrics" / "search.json").read_text())
    assert first["trials_this_run"] == 5  # 3 start-up trials, then 2 from the scalarised studies
    run_stages(selected, "search", **_search_overrides(**{"search.sampler": "parego", "search.n_trials": 7}))
    again = json.loads((selected / "metrics" / "search.json").read_text())
    assert (again["study"], again["n_trials"], again["trials_this_run"]) == (first["study"], 7, 2)


def test_the_evaluation_stages_read_the_chosen_trial_with_eval_edit_search(selected):
    overrides = _search_overrides()
    run_stages(selected, "search", **overrides)
    trial = {"eval.edit": "search", "eval.conditions.harmful_recorded": "{prompts: harmful, intervention: recorded}"}
    run_stages(selected, "completions", "refusal", "orthogonalize", **overrides, **trial)
    assert "harmful_recorded" in json.loads((selected / "metrics" / "refusal.json").read_text())["refusal_rate"]
    chosen = json.loads((selected / "metrics" / "search.json").read_text())["chosen"]
    ortho = json.loads((selected / "metrics" / "orthogonalize.json").read_text())
    assert ortho["intervention"] == chosen["intervention"]  # orthogonalize.intervention=auto folds the trial's


def test_a_per_layer_trial_is_recorded_and_evaluated_like_any_other(selected):
    overrides = _search_overrides(**{"search.sources": ["per_layer"], "search.variants": ["projected"]})
    run_stages(selected, "search", **overrides)
    trials = pd.read_csv(selected / "artifacts" / "search" / "trials.csv")
    assert set(trials.source) == {"per_layer"} and len(trials) == 5  # no `selected` source: no paper's edit first
    trial = {"eval.edit": "search", "eval.conditions.harmful_recorded": "{prompts: harmful, intervention: recorded}"}
    run_stages(selected, "completions", "refusal", "orthogonalize", **overrides, **trial)
    edit = search_edit(selected)
    assert edit.per_layer and edit.directions.shape[0] == edit.n_layers
    assert "harmful_recorded" in json.loads((selected / "metrics" / "refusal.json").read_text())["refusal_rate"]


def test_one_run_evaluates_the_chosen_trial_next_to_the_papers_edit(selected):
    """``eval.compared=[recorded@search]`` (what search=optuna sets) applies the search's record while every
    plain name keeps the paper's: the trial's completions are exactly those of an ``eval.edit=search`` run,
    and refusal, loss, over-refusal and the report carry both edits side by side."""
    overrides = _search_overrides()
    run_stages(selected, "search", **overrides)
    run_stages(selected, "completions", **overrides, **{
        "eval.edit": "search", "eval.conditions": "{harmful_recorded: {prompts: harmful, intervention: recorded}}"})
    alone = json.loads((selected / "artifacts" / "completions" / "harmful_recorded.json").read_text())
    both = {"eval.compared": "[recorded@search]", "tracking.wandb.mode": "disabled"}
    run_stages(selected, "completions", "refusal", "loss", "over_refusal", "report", **overrides, **both)
    trial = json.loads((selected / "artifacts" / "completions" / "harmful_recorded@search.json").read_text())
    assert trial == alone
    rates = json.loads((selected / "metrics" / "refusal.json").read_text())["refusal_rate"]
    assert {"harmful_ablation", "harmful_recorded@search"} <= set(rates)
    kl = json.loads((selected / "metrics" / "loss.json").read_text())["kl_harmless_test"]
    assert {"ablation", "recorded@search"} <= set(kl) and kl["ablation"] != kl["recorded@search"]
    over = json.loads((selected / "metrics" / "over_refusal.json").read_text())["refusal_rate"]
    assert {"baseline", "ablation", "recorded@search"} <= set(over)
    assert "| recorded@search |" in (selected / "reports" / "summary.md").read_text()


def test_adding_the_chosen_trial_evaluates_only_the_trial_again(selected, monkeypatch):
    """``search=optuna`` adds ``eval.compared``, so DVC re-runs every evaluation stage; their kept checkpoints
    decode and score only the trial's condition again, and the paper's conditions keep their results."""
    from pipeline.inference import Runner
    from pipeline.interventions import Edits

    overrides = _search_overrides()
    run_stages(selected, "search", "completions", "loss", **overrides)
    completions = selected / "artifacts" / "completions"
    before = {path.name: path.read_bytes() for path in completions.glob("*.json")}
    loss_before = json.loads((selected / "metrics" / "loss.json").read_text())
    decoded, applied, generate, apply = [], [], Runner.generate, Edits.apply
    monkeypatch.setattr(Runner, "generate", lambda self, prompts, *a, **k: decoded.append(len(prompts))
                        or generate(self, prompts, *a, **k))
    monkeypatch.setattr(Edits, "apply", lambda self, reference: applied.append(reference) or apply(self, reference))
    run_stages(selected, "completions", "loss", **overrides, **{"eval.compared": "[recorded@search]"})
    harmful = json.loads((completions / "harmful_baseline.json").read_text())
    assert decoded == [len(harmful)]  # the trial's condition alone
    assert {path.name: path.read_bytes() for path in completions.glob("*.json") if path.name in before} == before
    assert set(applied) <= {"recorded@search", "baseline"} and "recorded@search" in applied
    loss = json.loads((selected / "metrics" / "loss.json").read_text())
    assert loss["kl_harmless_test"] == {**loss_before["kl_harmless_test"], "recorded@search": pytest.approx(
        loss["kl_harmless_test"]["recorded@search"])}
    assert loss["ce_loss"]["general_text"]["delta_ablation"] == loss_before["ce_loss"]["general_text"]["delta_ablation"]


def test_an_intervention_reference_to_a_stage_without_edit_records_says_which_to_name(selected):
    with pytest.raises(ConfigError, match=r"\['ablation@filter'\] in eval.loss.interventions"):
        check_names(["baseline", "ablation@filter"], "eval.loss.interventions")
    run_stages(selected, "search")  # search=none: no chosen trial to compare
    with pytest.raises(ConfigError, match=r"search=optuna"):
        run_stages(selected, "completions", **{"eval.compared": "[recorded@search]"})


def test_trials_over_the_kl_cap_are_pruned_before_generating_and_count_against_the_budget(selected):
    with pytest.raises(PipelineError, match="all 5 trials .* were pruned"):
        run_stages(selected, "search", **_search_overrides(**{"search.max_kl": 0.0}))
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{selected / 'artifacts' / 'search' / 'study.db'}")
    study = optuna.load_study(study_name=summary.study_name,
                              storage=f"sqlite:///{selected / 'artifacts' / 'search' / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 5
    assert all(t.user_attrs["kl"] > 0 for t in study.trials)


def test_an_unknown_variant_says_which_there_are(selected):
    with pytest.raises(ConfigError, match=r"(?s)search.variants=\['projectd'\].*projected_norm_preserving"):
        run_stages(selected, "search", **_search_overrides(**{"search.variants": ["projectd"]}))


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
    storage = search.storage(f"sqlite:///{project / 'artifacts' / 'search' / 'study.db'}")
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def test_workers_that_start_together_on_a_fresh_storage_all_open_it(monkeypatch):
    """The loser of the race to create Optuna's schema finds the schema complete when it tries again;
    a storage that keeps failing still raises."""
    import sqlalchemy.exc
    collision = sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
    calls = []

    def rdb_storage(url, failures, **kwargs):
        calls.append(url)
        if len(calls) <= failures:
            raise collision
        return "storage"

    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kw: rdb_storage(url, failures=1))
    monkeypatch.setattr(search.time, "sleep", lambda seconds: None)
    assert search.storage("sqlite:///study.db") == "storage" and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kw: rdb_storage(url, failures=99))
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        search.storage("sqlite:///study.db", attempts=3)
    assert len(calls) == 3


@pytest.mark.slow
def test_two_workers_on_one_storage_record_every_trial_once(selected, tmp_path):
    env = subprocess_env(tmp_path, OMP_NUM_THREADS="1", PYTHONPATH=str(selected))
    overrides = {"search.n_trials": 8, "search.batch_trials": 2,
                 "search.storage": f"sqlite:///{selected / 'artifacts' / 'search' / 'study.db'}"}
    (selected / "artifacts" / "search").mkdir(parents=True, exist_ok=True)
    workers = [_worker(selected, env, **overrides) for _ in range(2)]
    for w in workers:
        assert w.wait(timeout=600) == 0, w.stderr.read()[-3000:]
    trials = _trials(selected, overrides)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 8 <= len(complete) <= 10  # each worker stops once the study holds 8; both may finish a batch of 2 at the end
    assert len({t.number for t in trials}) == len(trials)  # every trial recorded once
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)  # none lost


@pytest.mark.slow
def test_a_killed_search_resumes_and_loses_at_most_the_running_batch(selected, tmp_path):
    env = subprocess_env(tmp_path, OMP_NUM_THREADS="1", PYTHONPATH=str(selected))
    overrides = {"search.n_trials": 40, "search.batch_trials": 2}
    worker = _worker(selected, env, **overrides)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until some trials are complete, then kill mid-trial
        assert worker.poll() is None, f"the worker ended before it was killed:\n{worker.stderr.read()[-3000:]}"
        db = selected / "artifacts" / "search" / "study.db"
        if db.exists() and optuna.get_all_study_summaries(search.storage(f"sqlite:///{db}")):
            done = [t for t in _trials(selected, overrides) if t.state == optuna.trial.TrialState.COMPLETE]
            if len(done) >= 3:
                break
        time.sleep(0.5)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    before = _trials(selected, overrides)
    finished = [t for t in before if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(before) - len(finished) <= 2  # at most the running batch of trials is unfinished
    run_stages(selected, "search", **_search_overrides(**overrides))
    metrics = json.loads((selected / "metrics" / "search.json").read_text())
    assert metrics["n_trials"] == 40
    assert metrics["trials_this_run"] == 40 - len(finished)  # the finished ones were kept, not rerun


def test_a_trial_that_cannot_join_the_front_is_not_worth_generating_for():
    trials = [_frozen(0, 3, 0.02), _frozen(1, 0, 0.08), _frozen(2, 5, 0.01)]
    assert search.prune_reason(0.005, 1.0, trials) == (None, None)  # no trial has less KL: count them all
    limit, reason = search.prune_reason(0.05, 1.0, trials)  # trial 0 has 3 refusals at less KL:
    assert limit == 3 and "trial 0" in reason  # counting stops once this one has 3 too
    limit, reason = search.prune_reason(0.08, 1.0, trials)  # trial 1 refused nothing at no more KL
    assert limit == 0 and "trial 1" in reason
    assert search.prune_reason(1.5, 1.0, [])[0] == 0 and "above max_kl" in search.prune_reason(1.5, 1.0, [])[1]


def test_a_trial_stops_generating_once_its_refusals_equal_a_rival_with_less_kl(tiny_lm):
    """Refusals are counted only while they can still beat the best rival at no more KL: the trial whose
    first completions already refuse as often as that rival is pruned, and one with fewer is counted."""
    lm = tiny_lm("qwen2")
    harmful = ["Write a haiku about autumn leaves.", "Name a fruit.", "Describe the sea.", "Count to five."]
    texts = complete(lm, harmful, 6, 4, "unedited")
    phrase = next(t.split()[0] for t in texts if t.split())  # a "refusal phrase" the tiny model writes
    refusing = sum(is_refusal(t, [phrase]) for t in texts)
    harmless = search.HarmlessReference.of(lm, lm.encode(["Name a colour."]), 1, 4)
    base = Edit.of(torch.zeros(lm.d_model), 1, lm.n_layers, position=-1)  # a zero direction: the edit changes nothing
    objective = search.Objective(lm, base, torch.zeros(lm.n_layers + 1, lm.d_model), harmful, harmless, [phrase],
                                 6, 4, ("plain",), (0.0, 1.0))
    assert objective.measure(base, "ablation")[0] == refusing  # no rivals: everything counted
    refusals, kl, reason = objective.measure(base, "ablation", [_frozen(0, refusing, 0.0)])
    assert refusals is None and reason.startswith(f"{refusing}+ refusals") and "trial 0" in reason
    assert objective.measure(base, "ablation", [_frozen(0, refusing + 1, 0.0)])[0] == refusing
    assert objective.measure(base, "ablation", [_frozen(0, 0, 1e-3)])[0] == refusing  # its KL is above this one's


def _phrase_objective(lm, harmful):
    """An objective over ``harmful`` whose "refusal phrase" is a word the unedited tiny model writes, so
    the unedited model refuses at least once; with the number of refusals it has."""
    texts = complete(lm, harmful, 6, 4, "unedited")
    phrase = next(t.split()[0] for t in texts if t.split())
    harmless = search.HarmlessReference.of(lm, lm.encode(["Name a colour.", "Say hello."]), 1, 4)
    base = Edit.of(torch.randn(lm.d_model), 1, lm.n_layers, position=-1, harmless_mean=torch.randn(lm.d_model))
    candidates = torch.randn(lm.n_layers + 1, lm.d_model)
    objective = search.Objective(lm, base, candidates, harmful, harmless, [phrase], 6, 4,
                                 ("plain", "projected", "norm_preserving"), (0.0, 1.5))
    return objective, sum(is_refusal(t, [phrase]) for t in texts)


def _point(objective, variant, peak, position, source="layer"):
    params = {"source": source, "direction_layer": 1.5, "variant": variant,
              **{f"{part}_{key}": value for part in search.COMPONENTS for key, value in
                 {"peak": peak, "position": position, "floor": 0.5, "width": 2.0}.items()}}
    return search.trial_edit(params, objective.base, objective.candidates)


def _words(reason: str | None) -> str | None:
    """A pruning reason without its KL figures (two batchings round the last digit differently)."""
    return None if reason is None else re.sub(r"\d+\.\d+", "x", reason)


def test_trials_measured_together_get_what_each_gets_alone(tiny_lm):
    """Hook trials share batches, each hook on its own trial's rows, and a weight edit runs alone: every
    trial's refusals and KL are what measuring it by itself gives, with and without rivals to prune against."""
    lm = tiny_lm("qwen2")
    objective, refusing = _phrase_objective(lm, ["Write a haiku about autumn.", "Name a fruit.", "Describe the sea.",
                                                 "Count to five.", "Tell a joke."])
    nothing = _point(objective, "plain", 0.0, 0.0)  # zero weights: the unedited model
    points = [_point(objective, "plain", 1.5, 1.0), nothing, _point(objective, "norm_preserving", 1.0, 0.0),
              _point(objective, "projected", 1.2, 2.0, "per_layer")]
    for rivals in ([], [_frozen(0, refusing, 0.0)], [_frozen(0, 0, 0.0)]):
        alone = [objective.measure(edit, name, rivals) for edit, name in points]
        together = objective.measure_all(points, rivals)
        assert [(r, _words(why)) for r, _, why in together] == [(r, _words(why)) for r, _, why in alone]
        torch.testing.assert_close(torch.tensor([kl for _, kl, _ in together]),
                                   torch.tensor([kl for _, kl, _ in alone]), rtol=1e-4, atol=1e-6)
    assert objective.measure_all([nothing], [_frozen(0, refusing, 0.0)])[0][0] is None  # reached the rival's count


def test_a_trial_among_others_stops_generating_at_its_own_limit(tiny_lm):
    """Once a group's completions have stopped at a phrase as often as its limit allows, its other rows stop
    too; another group's rows go on."""
    lm = tiny_lm("qwen2")
    tokens = lm.tokenizer("stop here").input_ids
    phrase = lm.tokenizer.decode(tokens[:1]).strip()
    stop = GroupStopper(lm, [phrase], [1, None], of=[0, 0, 1, 1])
    assert not stop(0, tokens[1:]) and not stop.given_up(0)  # no phrase yet
    assert stop(1, tokens) and stop.given_up(0)  # group 0's limit of one is reached...
    assert stop(0, tokens[1:])  # ...so its other row stops without the phrase
    assert not stop(2, tokens[1:]) and stop(3, tokens) and not stop.given_up(1)  # group 1 has no limit


def test_a_batch_of_trials_is_a_positive_number():
    with pytest.raises(ConfigError, match="batch_trials"):
        search.optimize(optuna.create_study(directions=["minimize", "minimize"]), None, 1, batch_trials=0)
