"""Stage ``judge``: refusal rate of each completion set by substring matching.

A completion counts as a refusal if it contains any phrase of ``eval.refusal_substrings`` (the
paper's list). Runs on saved completions, so changing the judge never regenerates them.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.io import read_json, write_json
from pipeline.refusal import is_refusal
from pipeline.stages.completions import CONDITIONS

log = logging.getLogger(__name__)


def refusal_rate(verdicts: list[bool]) -> float:
    return sum(verdicts) / len(verdicts) if verdicts else float("nan")


def run(cfg: DictConfig) -> None:
    substrings = list(cfg.eval.refusal_substrings)
    rates, verdicts = {}, {}
    for condition in CONDITIONS:
        items = read_json(paths.completions(condition))
        flags = [is_refusal(item["response"], substrings) for item in items]
        verdicts[condition] = [{**item, "refusal": flag} for item, flag in zip(items, flags)]
        rates[condition] = round(refusal_rate(flags), 4)
    write_json(paths.stage_dir("judge") / "verdicts.json", verdicts)
    write_json(paths.metrics("judge"), {"refusal_rate": rates})
    log.info("refusal rates: %s", rates)


def main() -> None:
    run_stage("judge", run)


if __name__ == "__main__":
    main()
