"""How far a figure can be trusted: 95% Wilson intervals, exact McNemar tests between paired conditions,
intervals of per-token means over sampled documents, and a judge's agreement with human labels.

Refusal rates here come from tens of prompts, so their sampling error is several points; two
conditions evaluated on the same prompts (baseline vs an intervention) are compared on the prompts
where their verdicts differ, which is far more sensitive than comparing the two rates' intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.stats import binomtest, norm
from sklearn.metrics import cohen_kappa_score, confusion_matrix


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (None for n = 0): sensible near 0 and 1, unlike the normal one."""
    if n == 0:
        return None
    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return round(float(ci.low), 4), round(float(ci.high), 4)


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> dict[str, float | int]:
    """Exact (binomial) McNemar test of two paired verdict lists: how many flip each way, and the two-sided p."""
    if len(first) != len(second):
        raise ValueError(f"paired verdicts of different lengths: {len(first)} and {len(second)}")
    only_first = sum(a and not b for a, b in zip(first, second))
    only_second = sum(b and not a for a, b in zip(first, second))
    discordant = only_first + only_second
    p = binomtest(only_first, discordant, 0.5).pvalue if discordant else 1.0
    return {"only_first": only_first, "only_second": only_second, "p_value": round(float(p), 6)}


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float],
                   confidence: float = 0.95) -> tuple[float, float] | None:
    """Interval of ``sum(numerators) / sum(denominators)`` (e.g. nats per token) when the sampled units are
    the pairs (documents), not the tokens inside them: the delta method's normal interval of a ratio
    estimator. None below two units. For a paired difference pass per-document differences."""
    n = len(numerators)
    if n != len(denominators):
        raise ValueError(f"{n} numerators but {len(denominators)} denominators")
    if n < 2:
        return None
    ratio = sum(numerators) / sum(denominators)
    spread = sum((a - ratio * b) ** 2 for a, b in zip(numerators, denominators)) / (n - 1)
    half = norm.ppf(0.5 + confidence / 2) * math.sqrt(spread / n) / (sum(denominators) / n)
    return round(ratio - half, 6), round(ratio + half, 6)


def agreement(labels: Sequence[str], verdicts: Sequence[str | None], classes: Sequence[str]) -> dict:
    """How a judge's ``verdicts`` agree with human ``labels``: accuracy and Cohen's kappa (agreement beyond
    chance) over every item, an unparsable verdict (None) counting as a disagreement of its own kind,
    and the confusion matrix ``{label: {verdict: count}}``."""
    if len(labels) != len(verdicts) or not labels:
        raise ValueError(f"{len(labels)} labels and {len(verdicts)} verdicts: need equally many, at least one")
    found = [v if v is not None else "unparsable" for v in verdicts]
    columns = [*classes, "unparsable"]
    counts = confusion_matrix(list(labels), found, labels=columns)
    kappa = cohen_kappa_score(list(labels), found, labels=columns)
    return {
        "n": len(labels),
        "accuracy": round(sum(a == b for a, b in zip(labels, found)) / len(labels), 4),
        "kappa": round(float(kappa), 4) if math.isfinite(kappa) else None,
        "unparsable": found.count("unparsable"),
        "confusion": {label: {c: int(n) for c, n in zip(columns, row) if n} for label, row in zip(columns, counts)
                      if label in classes and row.sum()},
    }
