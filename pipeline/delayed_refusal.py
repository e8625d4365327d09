"""Delayed refusals: does the verdict on a short completion hold when the model is let to go on?

Evaluation completions are short on a CPU (``eval.max_new_tokens``), and a model can comply for a
sentence and then refuse ("Sure, here is... However, I can't"), or the reverse. Greedy decoding makes
the first ``b`` tokens of a long completion the completion a budget of ``b`` would have produced, so one
long generation per prompt gives the verdict at every shorter budget: cut it at ``b`` tokens and judge
the cut. The share of verdicts that differ from the long budget's says how far a short-budget refusal
rate can be trusted, and which budget is long enough.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def verdicts_by_budget(completions: Sequence[Sequence[int]], budgets: Sequence[int],
                       judge: Callable[[Sequence[int]], bool]) -> dict[int, list[bool]]:
    """``{budget: [verdict of each completion cut at budget tokens]}``."""
    return {budget: [judge(tokens[:budget]) for tokens in completions] for budget in budgets}


def changed_shares(verdicts: dict[int, list[bool]], long_budget: int) -> dict[int, float]:
    """Share of completions whose verdict at each budget differs from their verdict at ``long_budget``."""
    final = verdicts[long_budget]
    if not final:
        raise ValueError("no completions to compare")
    return {budget: sum(a != b for a, b in zip(flags, final)) / len(final) for budget, flags in verdicts.items()}


def shortest_stable_budget(shares: dict[int, float], max_change: float) -> int:
    """The shortest budget at which, and at every longer one, fewer than ``max_change`` of verdicts change."""
    stable = None
    for budget in sorted(shares, reverse=True):
        if shares[budget] >= max_change:
            break
        stable = budget
    if stable is None:  # only when max_change <= 0: the long budget itself changes nothing
        raise ValueError(f"max_change must be positive, got {max_change}")
    return stable
