"""Greedy completions for evaluation, with an explicit stop policy.

``eval.stop_policy`` says when a completion may end before ``max_new_tokens``:

* ``refusal_substring``: once it contains a refusal phrase of ``eval.refusal_substrings``. The substring
  judge calls a completion a refusal as soon as it contains one, so stopping there leaves every
  substring verdict unchanged and saves the tokens after it.
* ``none``: never (whole completions, e.g. for model judges or reading the responses in full).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.checkpoint import Checkpoint
from pipeline.errors import ConfigError
from pipeline.models.loading import LoadedModel
from pipeline.refusal import is_refusal

STOP_POLICIES = ("none", "refusal_substring")


def stop_phrases(policy: str, refusal_substrings: Sequence[str]) -> list[str]:
    """The phrases that end a completion early under stop policy ``policy`` (none for ``none``)."""
    if policy not in STOP_POLICIES:
        raise ConfigError(f"eval.stop_policy={policy!r}", f"use one of: {', '.join(STOP_POLICIES)}")
    return list(refusal_substrings) if policy == "refusal_substring" else []


def complete(lm: LoadedModel, texts: list[str], max_new_tokens: int, batch_size: int, desc: str,
             store: Checkpoint | None = None, stop_at: Sequence[str] = ()) -> list[str]:
    """Greedy completions, decoded and stripped; ``store`` makes finished batches survive a kill, and a
    completion stops once it contains a phrase of ``stop_at``."""
    return complete_ids(lm, lm.encode(texts), max_new_tokens, batch_size, desc, store, stop_at)


def complete_ids(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str,
                 store: Checkpoint | None = None, stop_at: Sequence[str] = ()) -> list[str]:
    """``complete`` for prompts already encoded (``lm.encode``, e.g. with an adversarial suffix's ids)."""
    tokens = completion_tokens(lm, prompts, max_new_tokens, batch_size, desc, store, stop_at)
    return [decode(lm, t) for t in tokens]


def decode(lm: LoadedModel, tokens: Sequence[int]) -> str:
    return lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def completion_tokens(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str,
                      store: Checkpoint | None = None, stop_at: Sequence[str] = ()) -> list[list[int]]:
    """The generated token ids of ``complete_ids``, for measures that cut a completion at a token budget."""
    stop = (lambda tokens: is_refusal(decode(lm, tokens), stop_at)) if stop_at else None
    return lm.runner(batch_size).generate(prompts, lm.chat.prefix_ids, max_new_tokens, lm.eos_ids, desc=desc,
                                          store=store, stop=stop)
