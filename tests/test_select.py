"""Direction selection follows the paper's filters and ordering; pruning never changes the choice, and
successive halving picks the exhaustive choice among the candidates it keeps, for less work."""

import math

import pandas as pd
import pytest
import torch

from conftest import HARMFUL, PROMPTS
from pipeline.errors import ConfigError, SelectionError
from pipeline.selection import HALVED_OUT, NOT_NEEDED, Halving, Rules, choose, score_candidates, score_table

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


def _midway(grid: torch.Tensor) -> float:
    """A threshold between two observed scores near the median, away from any tie."""
    values = grid[:, :3].flatten().sort().values  # early layers, which the layer rule keeps
    k = len(values) // 2
    return float(values[k - 1] + values[k]) / 2


def _midway_rules(full) -> Rules:
    """Thresholds chosen so that every filter removes something on a random model."""
    return Rules(kl_threshold=_midway(full.kl), induce_threshold=_midway(full.induce_score), prune_layer_fraction=0.2)


def test_pruned_scoring_picks_the_same_direction_as_exhaustive(tiny_lm):
    lm = tiny_lm("qwen2")
    torch.manual_seed(0)
    candidates = torch.randn(lm.chat.n_post_instruction, lm.n_layers + 1, lm.d_model)
    full = score_candidates(lm, candidates, PROMPTS[:3], PROMPTS[3:], PAPER, "exhaustive", batch_size=4)
    rules = _midway_rules(full)
    labels = lm.chat.post_instruction_labels()
    norms = candidates.norm(dim=-1)
    exhaustive = score_table(full, rules, lm.n_layers, labels, norms)
    pruned = score_table(score_candidates(lm, candidates, PROMPTS[:3], PROMPTS[3:], rules, "rules_first",
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
    one = score_candidates(lm, candidates, PROMPTS[:3], PROMPTS[3:], PAPER, "exhaustive", batch_size=2)
    stacked = score_candidates(lm, candidates, PROMPTS[:3], PROMPTS[3:], PAPER, "exhaustive", batch_size=2,
                               per_pass=3)
    for metric in ("bypass_score", "induce_score", "kl"):
        torch.testing.assert_close(getattr(stacked, metric), getattr(one, metric), rtol=1e-5, atol=1e-6)


def test_the_papers_scores_are_unchanged_by_the_intervention_registry(tiny_lm):
    """Selection scores as the code before the edit record computed them (tests/data, from commit 9bb13f1)."""
    import json
    from pathlib import Path


    before = json.loads((Path(__file__).parent / "data" / "paper_scores_before_refactor.json").read_text())
    lm = tiny_lm("qwen2")
    candidates = torch.randn(2, lm.n_layers + 1, lm.d_model, generator=torch.Generator().manual_seed(0))
    scores = score_candidates(lm, candidates, HARMFUL[:4], PROMPTS, Rules(1e9, -1e9, 0.0), "exhaustive", 4, 2)
    for metric in ("bypass_score", "induce_score", "kl"):
        torch.testing.assert_close(getattr(scores, metric), torch.tensor(before[metric], dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)


def test_halving_rungs_double_the_prompts_and_keep_the_better_part():
    assert Halving(min_prompts=8).rungs(32) == [(0, 8), (8, 16), (16, 32)]
    assert Halving(min_prompts=8).rungs(20) == [(0, 8), (8, 16), (16, 20)]
    assert Halving(min_prompts=8).rungs(5) == [(0, 5)]  # too few prompts to halve: one rung on all
    assert Halving(keep=0.5, min_keep=8).survivors(110) == 55
    assert Halving(keep=0.5, min_keep=8).survivors(10) == 8
    assert Halving(keep=0.5, min_keep=8).survivors(5) == 5
    with pytest.raises(ConfigError, match="min_prompts"):
        Halving(keep=0.0)


@pytest.fixture
def scored(tiny_lm):
    """A tiny model, random candidates, their exhaustive scores and rules every filter bites on."""
    lm = tiny_lm("qwen2")
    candidates = torch.randn(lm.chat.n_post_instruction, lm.n_layers + 1, lm.d_model,
                             generator=torch.Generator().manual_seed(0))
    full = score_candidates(lm, candidates, HARMFUL[:4], PROMPTS[3:], PAPER, "exhaustive", batch_size=4)
    return lm, candidates, full


def _scored_table(lm, candidates, scores, rules):
    return score_table(scores, rules, lm.n_layers, lm.chat.post_instruction_labels(), candidates.norm(dim=-1))


def _site(row) -> tuple[int, int]:
    return int(row.position), int(row.layer)


def test_checking_the_rules_in_bypass_order_picks_the_exhaustive_choice(scored):
    lm, candidates, full = scored
    rules = _midway_rules(full)
    one_rung = Halving(min_prompts=4)  # all 4 harmful prompts in one rung: nothing is halved out
    lazy = score_candidates(lm, candidates, HARMFUL[:4], PROMPTS[3:], rules, "halving", 4, halving=one_rung)
    rules_first = score_candidates(lm, candidates, HARMFUL[:4], PROMPTS[3:], rules, "rules_first", 4)
    table = _scored_table(lm, candidates, lazy, rules)
    assert _site(choose(table)) == _site(choose(_scored_table(lm, candidates, full, rules)))
    assert NOT_NEEDED in set(table.status) and HALVED_OUT not in set(table.status)
    assert max(lazy.prompt_passes, rules_first.prompt_passes) < full.prompt_passes


def test_halving_picks_the_exhaustive_choice_among_the_candidates_it_keeps(scored):
    lm, candidates, full = scored
    rules = Rules(kl_threshold=_midway(full.kl), induce_threshold=-1e9, prune_layer_fraction=0.2)
    halving = Halving(min_prompts=1, keep=0.5, min_keep=2)  # rungs of 1, 1 and 2 harmful prompts
    halved = score_candidates(lm, candidates, HARMFUL[:4], PROMPTS[3:], rules, "halving", 4, halving=halving)
    table = _scored_table(lm, candidates, halved, rules)
    exhaustive = _scored_table(lm, candidates, full, rules)
    out = table.status == HALVED_OUT
    assert out.any() and (table.bypass_prompts[out] < 4).all()
    kept = exhaustive[~out & (exhaustive.status == "eligible")]
    assert _site(choose(table)) == _site(kept.loc[kept.bypass_score.idxmin()])
    complete = table.bypass_prompts == 4  # scored on every prompt: the exhaustive bypass score
    torch.testing.assert_close(torch.tensor(table.bypass_score[complete].values),
                               torch.tensor(exhaustive.bypass_score[complete].values), rtol=1e-5, atol=1e-6)


def test_when_no_survivor_passes_the_rules_the_halved_out_are_scored_and_the_choice_is_exhaustive(scored):
    lm, candidates, full = scored
    lenient = Rules(kl_threshold=1e9, induce_threshold=-1e9, prune_layer_fraction=0.2)
    one = Halving(min_prompts=1, keep=0.01, min_keep=1)  # a single survivor
    survivor = _site(choose(_scored_table(lm, candidates, score_candidates(
        lm, candidates, HARMFUL[:4], PROMPTS[3:], lenient, "halving", 4, halving=one), lenient)))
    n_pos = candidates.shape[0]
    kl_survivor = float(full.kl[survivor[0] + n_pos, survivor[1]])
    below = full.kl[:, :3][full.kl[:, :3] < kl_survivor]
    assert below.numel(), "this seed gives the survivor the lowest KL; pick another seed"
    strict = Rules(kl_threshold=(kl_survivor + float(below.max())) / 2, induce_threshold=-1e9, prune_layer_fraction=0.2)
    strict_scores = score_candidates(lm, candidates, HARMFUL[:4], PROMPTS[3:], strict, "halving", 4, halving=one)
    table = _scored_table(lm, candidates, strict_scores, strict)
    assert HALVED_OUT not in set(table.status)
    assert table.set_index(["position", "layer"]).status[survivor] == "kl_above_threshold"
    assert _site(choose(table)) == _site(choose(_scored_table(lm, candidates, full, strict)))


def test_an_unknown_scoring_mode_is_a_clear_error(scored):
    lm, candidates, _ = scored
    with pytest.raises(ConfigError, match="select.scoring"):
        score_candidates(lm, candidates, HARMFUL[:4], PROMPTS[3:], PAPER, "fastest", 4)
