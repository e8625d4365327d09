"""Degenerate output measured without a judge: repeated n-grams, tokens with no language in them, and the
unedited model's loss on the completion, each against a configured threshold."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import build_tokenizer, model_config
from pipeline import degenerate
from pipeline.config import compose_config
from pipeline.degenerate import (
    Thresholds,
    completion_losses,
    measure_conditions,
    non_language,
    repetition,
    token_texts,
)
from pipeline.errors import ConfigError

DEFAULTS = compose_config().eval.refusal.degenerate


def test_a_loop_repeats_its_ngrams_and_fresh_text_does_not():
    assert repetition([1, 2, 3, 4] * 5, 4) == pytest.approx(1 - 4 / 17)  # 17 4-grams, 4 distinct
    assert repetition(list(range(20)), 4) == 0.0
    assert repetition([7, 7, 7], 4) == 0.0  # shorter than one n-gram: nothing can repeat
    assert repetition([7] * 10, 1) == pytest.approx(0.9)


def test_tokens_with_no_letter_or_digit_of_any_script_are_non_language():
    pieces = ["Hello", " ,", "巴黎", "42", "!!!", "\n", " é", "→"]
    assert non_language(pieces) == pytest.approx(4 / 8)  # " ,", "!!!", "\n" and "→"
    assert non_language(["Привет", "مرحبا", "３"]) == 0.0
    assert non_language([]) == 1.0  # an empty completion holds no language at all


def test_a_token_holding_part_of_a_character_counts_as_that_character():
    tok = build_tokenizer("qwen2")  # byte-level BPE trained on English: each CJK character is several tokens
    ids, pieces = token_texts(tok, "巴黎")
    assert len(ids) > 2 and set(pieces) == {"巴", "黎"}
    assert non_language(pieces) == 0.0
    assert all("\ufffd" in tok.decode([i]) for i in ids)  # decoded alone, the pieces are not characters


def test_a_completion_is_degenerate_only_strictly_over_a_threshold():
    limits = Thresholds(ngram=4, max_repetition=0.5, max_non_language=0.8, max_loss=3.0)
    assert limits.exceeded({"repetition": 0.5, "non_language": 0.8, "loss": 3.0}) == []
    assert limits.exceeded({"repetition": 0.51, "non_language": 0.2, "loss": 1.0}) == ["repetition"]
    assert limits.exceeded({"repetition": 0.0, "non_language": 1.0, "loss": 9.0}) == ["non_language", "loss"]
    unmeasured = Thresholds(ngram=4, max_repetition=0.5, max_non_language=0.8, max_loss=None)
    assert unmeasured.exceeded({"repetition": 0.0, "non_language": 0.0, "loss": 9.0}) == []
    assert Thresholds.from_config(DEFAULTS).max_loss is None  # the loss pass is off by default


@pytest.mark.parametrize("key, value, message", [
    ("ngram", 0, "ngram"), ("max_repetition", 1.5, "between 0 and 1"), ("max_non_language", "high", "between 0"),
    ("max_loss", -1, "positive loss"),
])
def test_bad_thresholds_are_config_errors(key, value, message):
    bad = OmegaConf.merge(DEFAULTS, {key: value})
    with pytest.raises(ConfigError, match=message):
        Thresholds.from_config(bad)


def test_loss_is_the_unedited_models_mean_loss_per_response_token(tiny_lm):
    lm = tiny_lm("qwen2")
    items = [{"instruction": "Name a fruit.", "response": "An apple, a pear and a plum."},
             {"instruction": "Describe a sunset.", "response": ""}]
    losses = completion_losses(lm, items, batch_size=2)
    (ids, n_prompt), _ = lm.chat.encode_responses([i["instruction"] for i in items], [i["response"] for i in items])
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[n_prompt - 1:-1], torch.tensor(ids[n_prompt:])).item()
    assert losses[0]["loss"] == pytest.approx(expected, abs=1e-4)
    assert losses[1] == {"loss": None}  # nothing to score


def test_the_model_is_loaded_for_the_loss_only_when_a_loss_threshold_is_set(tiny_dir, monkeypatch):
    model_cfg = model_config("qwen2", tiny_dir("qwen2"))
    completions = {"a": [{"instruction": "Name a fruit.", "response": "An apple."}],
                   "b": [{"instruction": "Describe a sunset.", "response": "Sure! " * 12}]}
    with monkeypatch.context() as patch:
        patch.setattr(degenerate, "load_model", lambda *a: pytest.fail("the model was loaded without max_loss"))
        off = measure_conditions(model_cfg, completions, Thresholds(4, 0.5, 0.8, None), "cpu", 4)
    assert "loss" not in off["a"][0] and off["a"][0]["degenerate"] is False and off["b"][0]["degenerate"] is True
    # a random model finds any text unlikely (about ln(vocab) nats a token): over a threshold of 1 nat
    on = measure_conditions(model_cfg, completions, Thresholds(4, 0.5, 0.8, 1.0), "cpu", 4)
    assert on["a"][0]["loss"] > math.log(100) and on["a"][0]["degenerate"] is True
    assert {k: v for k, v in on["a"][0].items() if k not in ("loss", "degenerate")} == {
        k: v for k, v in off["a"][0].items() if k != "degenerate"}
