"""Stage ``refusal``: refusal rate of each completion set by substring matching, with how far to trust it.

A completion counts as a refusal if it contains any phrase of ``eval.refusal_substrings`` (the
paper's list). Runs on saved completions, so changing the phrases never regenerates them. Each rate
comes with its n and a 95% Wilson interval; each intervention is compared with the baseline on the same
prompts by an exact McNemar test (``pipeline.stats``).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.conditions import eval_conditions
from pipeline.io import read_json, write_json
from pipeline.refusal import is_refusal, refusal_rate
from pipeline.stats import mcnemar, wilson_interval

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> None:
    substrings = list(cfg.eval.refusal_substrings)
    conditions = eval_conditions(cfg.eval.conditions)
    rates, verdicts, flags = {}, {}, {}
    for condition in conditions:
        items = read_json(paths.completions(condition))
        flags[condition] = [is_refusal(item["response"], substrings) for item in items]
        verdicts[condition] = [{**item, "refusal": flag} for item, flag in zip(items, flags[condition])]
        rates[condition] = round(refusal_rate(flags[condition]), 4)
    baselines = {side: c for c, (side, name) in conditions.items() if name == "baseline"}
    paired = {c: mcnemar(flags[baselines[side]], flags[c]) for c, (side, name) in conditions.items()
              if name != "baseline" and side in baselines}
    write_json(paths.stage_dir("refusal") / "verdicts.json", verdicts)
    write_json(paths.metrics("refusal"), {
        "refusal_rate": rates,
        "n": {c: len(f) for c, f in flags.items()},
        "ci95": {c: wilson_interval(sum(f), len(f)) for c, f in flags.items()},
        "mcnemar_vs_baseline": paired,
    })
    log.info("refusal rates: %s", rates)


def main() -> None:
    run_stage("refusal", run)


if __name__ == "__main__":
    main()
