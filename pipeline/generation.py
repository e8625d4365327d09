"""Greedy completions for evaluation, with an explicit stop policy.

``eval.stop_policy`` says when a completion may end before ``max_new_tokens``:

* ``refusal_substring``: once it contains a refusal phrase of ``eval.refusal_substrings``. The substring
  judge calls a completion a refusal as soon as it contains one, so stopping there leaves every
  substring verdict unchanged and saves the tokens after it.
* ``none``: never (whole completions, e.g. for model judges or reading the responses in full).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from pipeline.checkpoint import Checkpoint, content_key
from pipeline.errors import ConfigError
from pipeline.hooks import acting_together
from pipeline.inference import Groups
from pipeline.models.loading import LoadedModel
from pipeline.refusal import is_refusal

log = logging.getLogger(__name__)

STOP_POLICIES = ("none", "refusal_substring")


class StopLimitReached(Exception):
    """``stop_limit`` completions have stopped at a ``stop_at`` phrase: the caller needs no more of them
    (the search: a trial with that many refusals is already beaten)."""


def stop_phrases(policy: str, refusal_substrings: Sequence[str]) -> list[str]:
    """The phrases that end a completion early under stop policy ``policy`` (none for ``none``)."""
    if policy not in STOP_POLICIES:
        raise ConfigError(f"eval.stop_policy={policy!r}", f"use one of: {', '.join(STOP_POLICIES)}")
    return list(refusal_substrings) if policy == "refusal_substring" else []


def complete(lm: LoadedModel, texts: list[str], max_new_tokens: int, batch_size: int, desc: str,
             store: Checkpoint | None = None, stop_at: Sequence[str] = (),
             stop_limit: int | None = None) -> list[str]:
    """Greedy completions, decoded and stripped; ``store`` makes finished batches survive a kill, and a
    completion stops once it contains a phrase of ``stop_at``. Once ``stop_limit`` completions have
    stopped so, generation ends by raising ``StopLimitReached``."""
    return complete_ids(lm, lm.encode(texts), max_new_tokens, batch_size, desc, store, stop_at, stop_limit)


def complete_ids(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str,
                 store: Checkpoint | None = None, stop_at: Sequence[str] = (),
                 stop_limit: int | None = None) -> list[str]:
    """``complete`` for prompts already encoded (``lm.encode``, e.g. with an adversarial suffix's ids)."""
    tokens = completion_tokens(lm, prompts, max_new_tokens, batch_size, desc, store, stop_at, stop_limit)
    return [decode(lm, t) for t in tokens]


def decode(lm: LoadedModel, tokens: Sequence[int]) -> str:
    return lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def completion_tokens(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str,
                      store: Checkpoint | None = None, stop_at: Sequence[str] = (),
                      stop_limit: int | None = None) -> list[list[int]]:
    """The generated token ids of ``complete_ids``, for measures that cut a completion at a token budget."""
    return lm.runner(batch_size).generate(prompts, lm.chat.prefix_ids, max_new_tokens, lm.eos_ids, desc=desc,
                                          store=store, stop=stopper(lm, stop_at, stop_limit))


def complete_conditions(lm: LoadedModel, edits, jobs: dict[str, tuple[str, list[str]]], max_new_tokens: int,
                        batch_size: int, desc: str, store: Checkpoint,
                        stop_at: Sequence[str] = ()) -> dict[str, list[str]]:
    """``complete`` for several conditions: ``jobs`` maps a condition to (intervention reference of
    ``edits``, prompts); see ``condition_tokens``."""
    encoded = {key: (reference, lm.encode(texts)) for key, (reference, texts) in jobs.items()}
    tokens = condition_tokens(lm, edits, encoded, max_new_tokens, batch_size, desc, store, stop_at)
    return {key: [decode(lm, t) for t in rows] for key, rows in tokens.items()}


def condition_tokens(lm: LoadedModel, edits, jobs: dict[str, tuple[str, list[list[int]]]], max_new_tokens: int,
                     batch_size: int, desc: str, store: Checkpoint,
                     stop_at: Sequence[str] = ()) -> dict[str, list[list[int]]]:
    """Generated token ids of each condition's encoded prompts under its intervention (``edits``, a
    ``pipeline.interventions.Edits``), in ``jobs``' order.

    Conditions whose interventions are hooks decode together, each hook acting on its own condition's
    rows: a decoding step costs a CPU far less per row over many rows than over a few (on the 1.5B default,
    1.5 s for 256 rows against 0.86 s for 80), and one batch has one tail of long completions instead of
    one per condition. A weight edit changes the model for every row, so its condition runs alone. Either
    way each completion is what it would be alone.

    Each condition's batches and tokens are kept in ``store``, scoped by its edit record, prompts and
    budget: a condition already there (a kept checkpoint's earlier run) is not decoded again.
    """
    versions = {key: content_key([edits.digest(reference), prompts, max_new_tokens, list(stop_at)])
                for key, (reference, prompts) in jobs.items()}
    scopes = {key: store.scope(key, version) for key, version in versions.items()}
    out: dict[str, list[list[int]]] = {}
    for key in jobs:
        if (found := scopes[key].get("tokens")) is not None:
            out[key] = found
    if out:
        log.info("%s: %s restored from the checkpoint", desc, ", ".join(out))
    todo = {key: job for key, job in jobs.items() if key not in out}
    stacked = [key for key, (reference, _) in todo.items() if edits.acts_through_hooks(reference)]
    if len(stacked) < 2:
        stacked = []
    if stacked:
        prompts = [p for key in stacked for p in todo[key][1]]
        of = [g for g, key in enumerate(stacked) for _ in todo[key][1]]
        with acting_together([partial(edits.apply, todo[key][0]) for key in stacked]) as rows:
            tokens = lm.runner(batch_size).generate(
                prompts, lm.chat.prefix_ids, max_new_tokens, lm.eos_ids, desc=f"{desc} ({len(stacked)} together)",
                store=store.scope("+".join(stacked), content_key([versions[key] for key in stacked])),
                stop=stopper(lm, stop_at, None), groups=Groups(of, rows.track))
        for key in stacked:
            out[key], tokens = tokens[: len(todo[key][1])], tokens[len(todo[key][1]):]
            scopes[key].put("tokens", out[key])
    for key, (reference, prompts) in todo.items():
        if key not in out:
            with edits.apply(reference):
                out[key] = completion_tokens(lm, prompts, max_new_tokens, batch_size, f"{desc}: {key}",
                                             scopes[key], stop_at)
            scopes[key].put("tokens", out[key])
    return {key: out[key] for key in jobs}


@dataclass
class GroupStopper:
    """The ``Runner.generate`` stop test for rows of several groups (``of[i]``: prompt ``i``'s group), each
    counting its own completions: a completion stops once it contains a phrase of ``stop_at``, and once
    ``limits[g]`` prompts of group ``g`` have stopped so (None: no limit), group ``g`` has ``given_up``: its
    other rows stop too, since its count can no longer matter (a search trial already beaten). Distinct
    prompts are counted, so a batch retried after running out of memory counts its prompts once."""

    lm: LoadedModel
    stop_at: Sequence[str]
    limits: Sequence[int | None]
    of: Sequence[int] | None = None  # None: every prompt is of group 0
    stopped: dict[int, set[int]] = field(default_factory=dict)

    def given_up(self, g: int) -> bool:
        limit = self.limits[g]
        return limit is not None and len(self.stopped.get(g, ())) >= limit

    def __call__(self, index: int, tokens: list[int]) -> bool:
        g = self.of[index] if self.of is not None else 0
        if self.given_up(g):
            return True
        if not is_refusal(decode(self.lm, tokens), self.stop_at):
            return False
        self.stopped.setdefault(g, set()).add(index)
        return True


def stopper(lm: LoadedModel, stop_at: Sequence[str], limit: int | None) -> Callable[[int, list[int]], bool] | None:
    """The ``Runner.generate`` stop test for ``stop_at`` (``GroupStopper`` with one group); it raises
    ``StopLimitReached`` once completions of ``limit`` distinct prompts have stopped."""
    if not stop_at:
        return None
    rows = GroupStopper(lm, stop_at, [limit])

    def stop(index: int, tokens: list[int]) -> bool:
        stopped = rows(index, tokens)
        if rows.given_up(0):
            raise StopLimitReached(f"completions of {limit} prompts stopped at a phrase of stop_at")
        return stopped

    return stop
