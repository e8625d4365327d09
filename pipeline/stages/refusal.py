"""Stage ``refusal``: refusal rate of each completion set by substring matching.

A completion counts as a refusal if it contains any phrase of ``eval.refusal_substrings`` (the
paper's list). Runs on saved completions, so changing the phrases never regenerates them.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.conditions import eval_conditions
from pipeline.io import read_json, write_json
from pipeline.refusal import is_refusal, refusal_rate

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> None:
    substrings = list(cfg.eval.refusal_substrings)
    rates, verdicts = {}, {}
    for condition in eval_conditions(cfg.eval.conditions):
        items = read_json(paths.completions(condition))
        flags = [is_refusal(item["response"], substrings) for item in items]
        verdicts[condition] = [{**item, "refusal": flag} for item, flag in zip(items, flags)]
        rates[condition] = round(refusal_rate(flags), 4)
    write_json(paths.stage_dir("refusal") / "verdicts.json", verdicts)
    write_json(paths.metrics("refusal"), {"refusal_rate": rates})
    log.info("refusal rates: %s", rates)


def main() -> None:
    run_stage("refusal", run)


if __name__ == "__main__":
    main()
