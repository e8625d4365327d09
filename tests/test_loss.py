"""The CE-loss check: its change from the baseline comes with an interval over documents, and the sample
grows only until that interval is as narrow as configured."""

import pytest
import torch
from omegaconf import OmegaConf

from conftest import PROMPTS
from pipeline.checkpoint import Checkpoint
from pipeline.edit import Edit
from pipeline.inference import text_sequences
from pipeline.interventions import Edits
from pipeline.stages.loss import sample_cross_entropies
from pipeline.stats import ratio_interval


def test_documents_with_the_same_loss_per_token_leave_no_doubt():
    assert ratio_interval([2.0, 6.0, 10.0], [1, 3, 5]) == (2.0, 2.0)


def test_the_interval_narrows_with_the_square_root_of_the_documents():
    nats, tokens = [3.0, 9.0, 4.0, 1.0, 6.0], [2, 5, 3, 1, 2]
    low, high = ratio_interval(nats, tokens)
    low4, high4 = ratio_interval(nats * 4, tokens * 4)  # four times the documents, same spread
    assert low < sum(nats) / sum(tokens) < high
    assert (high4 - low4) / (high - low) == pytest.approx(0.5, rel=0.15)
    assert ratio_interval([1.0], [4]) is None  # one document says nothing about the spread


def _loss_cfg(**overrides):
    return OmegaConf.create({"min_documents": 2, "ci_halfwidth": 0.01, "batch_size": 4, **overrides})


@pytest.fixture
def scoring(tiny_lm):
    lm = tiny_lm("qwen2")
    edit = Edit.of(torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0)), 1, lm.n_layers)
    return lm, Edits(lm, {"select": edit}, "select"), text_sequences(lm.tokenizer, PROMPTS * 2, 32)


def test_the_ce_sample_stops_once_every_change_is_known_closely_enough(scoring, tmp_path):
    lm, edits, sequences = scoring
    names = ["baseline", "ablation", "addition"]
    loose = sample_cross_entropies(lm, edits, names, sequences, (), _loss_cfg(ci_halfwidth=1e9), "text",
                                   Checkpoint(tmp_path / "loose"))
    assert loose["n_sequences"] == 2 and loose["n_available"] == len(sequences) > 2
    full = sample_cross_entropies(lm, edits, names, sequences, (), _loss_cfg(ci_halfwidth=None), "text",
                                  Checkpoint(tmp_path / "full"))
    assert full["n_sequences"] == len(sequences)
    for name in ("ablation", "addition"):
        low, high = full[f"ci95_delta_{name}"]
        assert low <= full[f"delta_{name}"] <= high


def test_ce_scored_in_rounds_equals_ce_scored_at_once(scoring, tmp_path):
    lm, edits, sequences = scoring
    rounds = sample_cross_entropies(lm, edits, ["baseline"], sequences, (), _loss_cfg(ci_halfwidth=None), "text",
                                    Checkpoint(tmp_path))
    at_once = lm.runner(64, progress=False).response_nll(sequences, ())
    expected = sum(n for n, _ in at_once) / sum(c for _, c in at_once)
    assert rounds["ce_baseline"] == pytest.approx(expected, abs=1e-5)


class Killed(Exception):
    """Stands in for the process being killed half-way through a stage."""


def test_a_killed_ce_scoring_resumes_from_its_finished_chunks(scoring, tmp_path, monkeypatch):
    lm, edits, sequences = scoring
    names, cfg = ["baseline", "ablation"], _loss_cfg(ci_halfwidth=None)
    uninterrupted = sample_cross_entropies(lm, edits, names, sequences, (), cfg, "text", Checkpoint(tmp_path / "a"))

    store, real, calls, killed = Checkpoint(tmp_path / "b"), type(lm.runner(1)).response_nll, [], []

    def dies_on_the_third_chunk(self, chunk, prefix=(), desc="loss"):
        calls.append(len(chunk))
        if len(calls) == 3 and not killed:
            killed.append(True)
            raise Killed
        return real(self, chunk, prefix, desc)

    monkeypatch.setattr(type(lm.runner(1)), "response_nll", dies_on_the_third_chunk)
    with pytest.raises(Killed):
        sample_cross_entropies(lm, edits, names, sequences, (), cfg, "text", store)
    assert store.count() == 2  # the first chunk, under both interventions

    calls.clear()
    resumed = sample_cross_entropies(lm, edits, names, sequences, (), cfg, "text", store)
    assert len(calls) == 2 * (-(-len(sequences) // cfg.min_documents) - 1)  # every chunk but the first
    assert resumed == uninterrupted


def test_each_change_gets_the_documents_its_own_interval_needs(scoring, tmp_path):
    """An intervention whose change is known closely enough stops being scored; the others go on, and each
    change is against the baseline on the same documents."""
    lm, edits, sequences = scoring
    names = ["baseline", "ablation", "addition"]
    first = sample_cross_entropies(lm, edits, names, sequences[:2], (), _loss_cfg(ci_halfwidth=None), "text",
                                   Checkpoint(tmp_path / "first"))
    halfwidth = {name: (first[f"ci95_delta_{name}"][1] - first[f"ci95_delta_{name}"][0]) / 2
                 for name in ("ablation", "addition")}
    narrow, wide = sorted(halfwidth, key=halfwidth.get)
    assert halfwidth[narrow] < halfwidth[wide]
    target = float(halfwidth[narrow] + halfwidth[wide]) / 2
    out = sample_cross_entropies(lm, edits, names, sequences, (), _loss_cfg(ci_halfwidth=target), "text",
                                 Checkpoint(tmp_path / "sized"))
    assert out[f"n_sequences_{narrow}"] == 2 < out[f"n_sequences_{wide}"] == out["n_sequences"]
    assert out[f"delta_{narrow}"] == first[f"delta_{narrow}"]
    for name in (narrow, wide):  # a CE and the baseline's differ by the change, whatever the sample sizes
        assert out[f"ce_{name}"] - out["ce_baseline"] == pytest.approx(out[f"delta_{name}"], abs=2e-5)


def test_a_large_change_stops_once_its_interval_is_a_small_share_of_it(scoring, tmp_path):
    """``ci_relative``: a change of 0.4 nats is known well enough at ±0.04, however wide that is in nats."""
    lm, edits, sequences = scoring
    names = ["baseline", "ablation", "addition"]
    first = sample_cross_entropies(lm, edits, names, sequences[:2], (), _loss_cfg(ci_halfwidth=None), "text",
                                   Checkpoint(tmp_path / "first"))
    share = {name: (first[f"ci95_delta_{name}"][1] - first[f"ci95_delta_{name}"][0]) / 2 / abs(first[f"delta_{name}"])
             for name in ("ablation", "addition")}
    sure, unsure = sorted(share, key=share.get)
    assert share[sure] < share[unsure]
    relative = float(share[sure] + share[unsure]) / 2
    out = sample_cross_entropies(lm, edits, names, sequences, (), _loss_cfg(ci_halfwidth=1e-9, ci_relative=relative),
                                 "text", Checkpoint(tmp_path / "relative"))
    assert out[f"n_sequences_{sure}"] == 2 < out[f"n_sequences_{unsure}"]
    assert out[f"delta_{sure}"] == first[f"delta_{sure}"]
