"""Direction selection follows the paper's filters and ordering; pruning never changes the choice."""

import math

import pandas as pd
import pytest
import torch

from conftest import PROMPTS
from pipeline.errors import SelectionError
from pipeline.selection import Rules, choose, score_candidates, score_table

PAPER = Rules(kl_threshold=0.1, induce_threshold=0.0, prune_layer_fraction=0.2)


def test_layer_pruning_drops_the_last_20_percent_of_layers():
    # paper: filter if layer >= int(n_layer * (1 - 0.2)); 28 layers -> layers 22..28 dropped
    assert [l for l in range(29) if not PAPER.layer_allowed(l, 28)] == list(range(22, 29))
    assert [l for l in range(33) if not PAPER.layer_allowed(l, 32)] == list(range(25, 33))


@pytest.mark.parametrize(
    ("layer", "induce", "kl", "bypass", "reason"),
    [
        (3, 0.5, 0.05, -2.0, None),
        (25, 0.5, 0.05, -2.0, "late_layer"),
        (3, -0.1, 0.05, -2.0, "induce_below_threshold"),
        (3, 0.0, 0.05, -2.0, None),  # the threshold itself passes (paper: filtered if score < threshold)
        (3, 0.5, 0.1, -2.0, None),  # KL equal to the threshold passes (paper: filtered if KL > threshold)
        (3, 0.5, 0.11, -2.0, "kl_above_threshold"),
        (3, math.nan, 0.05, -2.0, "induce_below_threshold"),
        (3, 0.5, math.nan, -2.0, "kl_above_threshold"),
        (3, 0.5, 0.05, math.nan, "bypass_not_finite"),
    ],
)
def test_rejection_rules(layer, induce, kl, bypass, reason):
    assert PAPER.rejection(layer, 28, induce, kl, bypass) == reason


def test_zero_direction_is_never_chosen():
    # layer 0: every prompt has the same post-instruction embeddings, so the difference in means is 0
    assert PAPER.rejection(0, 28, 0.5, 0.0, -9.0, norm=0.0) == "zero_direction"


def _table(rows):
    return pd.DataFrame(rows, columns=["position", "position_label", "layer", "bypass_score", "induce_score", "kl",
                                       "status"])


def test_choose_takes_lowest_bypass_among_eligible_and_first_on_ties():
    table = _table([
        (-2, "a", 1, -9.0, -1.0, 0.0, "induce_below_threshold"),  # best bypass but filtered
        (-2, "a", 2, -3.0, 1.0, 0.0, "eligible"),
        (-1, "b", 1, -5.0, 1.0, 0.0, "eligible"),
        (-1, "b", 2, -5.0, 1.0, 0.0, "eligible"),
    ])
    chosen = choose(table)
    assert (chosen.position, chosen.layer) == (-1, 1)


def test_nothing_eligible_is_a_clear_error():
    table = _table([(-1, "a", 1, -3.0, -1.0, 0.0, "induce_below_threshold")])
    with pytest.raises(SelectionError, match="filtered out"):
        choose(table)


def test_pruned_scoring_picks_the_same_direction_as_exhaustive(tiny_lm):
    lm = tiny_lm("qwen2")
    torch.manual_seed(0)
    candidates = torch.randn(lm.chat.n_post_instruction, lm.n_layers + 1, lm.d_model)
    full = score_candidates(lm, candidates, PROMPTS[:3], PROMPTS[3:], PAPER, exhaustive=True, batch_size=4)

    def midway(grid):  # a threshold between two observed scores near the median, away from any tie
        values = grid[:, :3].flatten().sort().values  # early layers, which the layer rule keeps
        k = len(values) // 2
        return float(values[k - 1] + values[k]) / 2

    # thresholds chosen so that every filter removes something on this random model
    rules = Rules(kl_threshold=midway(full.kl), induce_threshold=midway(full.induce_score), prune_layer_fraction=0.2)
    labels = lm.chat.post_instruction_labels()
    norms = candidates.norm(dim=-1)
    exhaustive = score_table(full, rules, lm.n_layers, labels, norms)
    pruned = score_table(score_candidates(lm, candidates, PROMPTS[:3], PROMPTS[3:], rules, exhaustive=False,
                                          batch_size=4), rules, lm.n_layers, labels, norms)
    assert set(exhaustive.status) >= {"late_layer", "induce_below_threshold", "kl_above_threshold", "eligible"}
    assert (exhaustive.status == pruned.status).all()
    a, b = choose(exhaustive), choose(pruned)
    assert (a.position, a.layer) == (b.position, b.layer)
    # every score the pruned run computed equals the exhaustive one
    for metric in ("bypass_score", "induce_score", "kl"):
        done = pruned[metric].notna()
        assert done.any()
        torch.testing.assert_close(torch.tensor(pruned[metric][done].values),
                                   torch.tensor(exhaustive[metric][done].values), rtol=1e-5, atol=1e-6)


def test_stacking_candidates_in_one_pass_gives_the_same_scores(tiny_lm):
    lm = tiny_lm("llama3")
    torch.manual_seed(1)
    candidates = torch.randn(lm.chat.n_post_instruction, lm.n_layers + 1, lm.d_model)
    one = score_candidates(lm, candidates, PROMPTS[:3], PROMPTS[3:], PAPER, exhaustive=True, batch_size=2)
    stacked = score_candidates(lm, candidates, PROMPTS[:3], PROMPTS[3:], PAPER, exhaustive=True, batch_size=2,
                               per_pass=3)
    for metric in ("bypass_score", "induce_score", "kl"):
        torch.testing.assert_close(getattr(stacked, metric), getattr(one, metric), rtol=1e-5, atol=1e-6)


def test_the_papers_scores_are_unchanged_by_the_intervention_registry(tiny_lm):
    """Selection scores as the code before the edit record computed them (tests/data, from commit 9bb13f1)."""
    import json
    from pathlib import Path

    from conftest import HARMFUL

    before = json.loads((Path(__file__).parent / "data" / "paper_scores_before_refactor.json").read_text())
    lm = tiny_lm("qwen2")
    candidates = torch.randn(2, lm.n_layers + 1, lm.d_model, generator=torch.Generator().manual_seed(0))
    scores = score_candidates(lm, candidates, HARMFUL[:4], PROMPTS, Rules(1e9, -1e9, 0.0), True, 4, 2)
    for metric in ("bypass_score", "induce_score", "kl"):
        torch.testing.assert_close(getattr(scores, metric), torch.tensor(before[metric], dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)
