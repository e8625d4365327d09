"""A refusal verdict on a short completion is checked against a long one: the share that changes says how
far a short-budget refusal rate can be trusted."""

import json

import pytest

from conftest import run_stages
from pipeline.delayed_refusal import changed_shares, shortest_stable_budget, verdicts_by_budget
from pipeline.errors import ConfigError

REFUSE = 9  # a token that makes the toy judge call the completion a refusal


def judge(tokens) -> bool:
    return REFUSE in tokens


def test_a_refusal_that_starts_after_the_short_budget_is_caught_by_the_long_one():
    completions = [[1, 2, 3, REFUSE], [REFUSE, 1], [1, 2, 3, 4, 5]]
    verdicts = verdicts_by_budget(completions, [2, 8], judge)
    assert verdicts == {2: [False, True, False], 8: [True, True, False]}
    assert changed_shares(verdicts, 8) == {2: pytest.approx(1 / 3), 8: 0.0}


def test_the_stable_budget_is_the_shortest_from_which_no_longer_budget_changes_too_many():
    shares = {16: 0.10, 32: 0.01, 64: 0.03, 128: 0.0, 256: 0.0}
    assert shortest_stable_budget(shares, 0.02) == 128  # 32 changes little, but 64 does not hold
    assert shortest_stable_budget(shares, 0.05) == 32
    assert shortest_stable_budget(shares, 0.5) == 16


def test_the_stage_compares_every_budget_with_the_long_completion(selected_project):
    run_stages(selected_project, "completions", "delayed_refusal")
    metrics = json.loads((selected_project / "metrics" / "delayed_refusal.json").read_text())
    assert metrics["n"] == 3 * 2  # three conditions, two prompts each
    assert set(metrics["changed_share"]) == {"2", "4", "8"}  # the budgets, the evaluation's (4) and the long one
    assert metrics["changed_share"]["8"] == 0.0
    assert metrics["shortest_stable_budget"] in (2, 4, 8)
    rows = json.loads((selected_project / "artifacts" / "delayed_refusal" / "completions.json").read_text())
    # cut at the evaluation budget, a long greedy completion is the one the completions stage generated
    short = json.loads((selected_project / "artifacts" / "completions" / "harmful_ablation.json").read_text())
    long = [r for r in rows if r["condition"] == "harmful_ablation"]
    assert len(long) == 2 and any(s["response"] for s in short[:2])
    assert all(r["response"].startswith(s["response"]) for s, r in zip(short, long))


def test_budgets_beyond_the_long_one_are_a_clear_error(selected_project):
    with pytest.raises(ConfigError, match="delayed_refusal"):
        run_stages(selected_project, "delayed_refusal", **{"eval.delayed_refusal.budgets": "[16]"})
