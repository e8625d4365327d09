"""Batching, prefix caching and greedy generation give the same numbers as plain one-prompt passes."""

import warnings

import pytest
import torch

from conftest import PROMPTS
from pipeline.hooks import directional_ablation


def _single_last_logits(lm, ids):
    with torch.no_grad():
        return torch.stack([lm.model(input_ids=torch.tensor([i])).logits[0, -1] for i in ids])


@pytest.mark.parametrize("family", ["qwen2", "llama3", "gemma2"])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_batched_last_logits_match_single_prompt_passes(tiny_lm, family, prefix_cache):
    lm = tiny_lm(family)
    ids = lm.encode(PROMPTS)
    runner = lm.runner(batch_size=3, progress=False)
    runner.use_prefix_cache = prefix_cache
    torch.testing.assert_close(runner.last_logits(ids, lm.chat.prefix_ids), _single_last_logits(lm, ids),
                               rtol=1e-4, atol=1e-4)


def test_prefix_cache_is_computed_under_the_active_hooks(tiny_lm):
    lm = tiny_lm("qwen2")
    ids = lm.encode(PROMPTS)
    r = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    runner = lm.runner(batch_size=2, progress=False)
    with directional_ablation(lm.model, lm.adapter, r):
        cached = runner.last_logits(ids, lm.chat.prefix_ids)
        plain = _single_last_logits(lm, ids)
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, _single_last_logits(lm, ids), atol=1e-3)


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_greedy_generation_matches_transformers_generate(tiny_lm, family):
    lm = tiny_lm(family)
    ids = lm.encode(PROMPTS)
    # make one row stop early: treat the token it generates second as an end-of-sequence token
    with torch.no_grad():
        first = lm.model.generate(torch.tensor([ids[0]]), max_new_tokens=3, do_sample=False,
                                  eos_token_id=None, pad_token_id=lm.tokenizer.pad_token_id)[0, len(ids[0]):]
    eos = sorted({*lm.eos_ids, int(first[1])})
    runner = lm.runner(batch_size=3, progress=False)
    got = runner.generate(ids, lm.chat.prefix_ids, max_new_tokens=6, eos_ids=eos)
    for prompt_ids, tokens in zip(ids, got):
        with torch.no_grad():
            ref = lm.model.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False,
                                    eos_token_id=eos, pad_token_id=lm.tokenizer.pad_token_id)[0, len(prompt_ids):]
        ref = [t for t in ref.tolist() if t not in eos]
        assert tokens == ref
    assert len(got[0]) == 1  # stopped at its end-of-sequence token, which is not returned


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_rows_of_very_different_lengths_are_prefilled_apart_and_decode_together(tiny_lm, family):
    """A long prompt and short ones in one generation batch: the prefill runs in two parts (the short rows are
    not padded to the long one), the caches are joined, and every row generates what it generates alone."""
    lm = tiny_lm(family)
    ids = lm.encode([" ".join(["word"] * 150), *PROMPTS[:3]])
    widths = []
    hook = lm.model.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                              with_kwargs=True)
    try:
        got = lm.runner(batch_size=4, progress=False).generate(ids, lm.chat.prefix_ids, 5, lm.eos_ids)
    finally:
        hook.remove()
    prefill = [shape for shape in widths if shape[1] > 1 and shape[1] != len(lm.chat.prefix_ids)]
    assert [rows for rows, _ in prefill] == [1, 3]  # the long row alone, then the three short ones
    for prompt_ids, tokens in zip(ids, got):
        alone = lm.runner(batch_size=1, progress=False).generate([prompt_ids], lm.chat.prefix_ids, 5, lm.eos_ids)
        assert tokens == alone[0]


def test_the_kv_cache_goes_by_the_name_this_transformers_reads(tiny_lm):
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; the old name warns on every pass."""
    lm = tiny_lm("qwen2")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        got = lm.runner(batch_size=2, progress=False).generate(lm.encode(PROMPTS), lm.chat.prefix_ids, 3, lm.eos_ids)
    assert len(got) == len(PROMPTS)


def test_stop_ends_only_the_rows_it_names_and_keeps_their_tokens_so_far(tiny_lm):
    lm = tiny_lm("qwen2")
    ids = lm.encode(PROMPTS)
    runner = lm.runner(batch_size=3, progress=False)
    full = runner.generate(ids, lm.chat.prefix_ids, max_new_tokens=8, eos_ids=[-1])
    marked = full[0][0]  # rows opening with this token stop after 3 tokens, the others run on
    stopped = runner.generate(ids, lm.chat.prefix_ids, max_new_tokens=8, eos_ids=[-1],
                              stop=lambda index, tokens: len(tokens) >= 3 and tokens[0] == marked)
    expected = [f[:3] if f[0] == marked else f for f in full]
    assert stopped == expected and any(len(s) == 8 for s in stopped)


def test_completions_stop_at_refusal_phrases_under_the_configured_stop_policy(tiny_lm):
    from pipeline.errors import ConfigError
    from pipeline.generation import complete, stop_phrases
    from pipeline.refusal import is_refusal

    assert stop_phrases("refusal_substring", ["I cannot"]) == ["I cannot"]
    assert stop_phrases("none", ["I cannot"]) == []
    with pytest.raises(ConfigError, match="stop_policy"):
        stop_phrases("at_refusal", ["I cannot"])

    lm = tiny_lm("qwen2")
    full = complete(lm, PROMPTS, 12, 2, "full")
    phrase = full[1].split()[1]  # a "refusal phrase" the tiny model writes in its second word for prompt 1
    stopped = complete(lm, PROMPTS, 12, 2, "stopped", stop_at=[phrase])
    assert [is_refusal(t, [phrase]) for t in stopped] == [is_refusal(t, [phrase]) for t in full]
    assert len(stopped[1]) < len(full[1]) and stopped[1] == full[1][: len(stopped[1])]


def test_generation_gives_up_once_enough_completions_have_stopped(tiny_lm):
    """What the search needs to abandon a trial that is already beaten: a count of stopped completions
    that raises at its limit, and counts a prompt once even when its batch runs again."""
    from pipeline.generation import StopLimitReached, complete, stopper

    lm = tiny_lm("qwen2")
    full = complete(lm, PROMPTS, 12, 4, "full")
    phrase = full[1].split()[1]
    stopping = sum(phrase.lower() in t.lower() for t in full)
    complete(lm, PROMPTS, 12, 4, "under the limit", stop_at=[phrase], stop_limit=stopping + 1)
    with pytest.raises(StopLimitReached):
        complete(lm, PROMPTS, 12, 4, "at the limit", stop_at=[phrase], stop_limit=stopping)
    stop = stopper(lm, [phrase], limit=2)
    tokens = lm.tokenizer.encode(phrase)
    assert stop(0, tokens) and stop(0, tokens)  # the same prompt twice (a retried batch): one stop
    with pytest.raises(StopLimitReached):
        stop(1, tokens)


def test_response_nll_matches_manual_cross_entropy(tiny_lm):
    lm = tiny_lm("qwen2")
    pairs = lm.chat.encode_responses(PROMPTS[:3], ["Sure, here it is.", "Paris.", "Leaves fall softly."])
    got = lm.runner(batch_size=2, progress=False).response_nll(pairs, lm.chat.prefix_ids)
    for (seq, n_prompt), (nll, count) in zip(pairs, got):
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([seq])).logits[0]
        want = torch.nn.functional.cross_entropy(logits[n_prompt - 1 : -1], torch.tensor(seq[n_prompt:]),
                                                 reduction="sum")
        assert count == len(seq) - n_prompt
        assert nll == pytest.approx(float(want), rel=1e-4)
