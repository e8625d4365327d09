"""Stage ``refusal``: refusal rate of each completion set by every configured refusal judge, with how far to
trust it.

Every judge named in ``eval.refusal.judges`` (definitions: ``eval.refusal_judges``, from
``conf/eval/refusal_judge``; ``pipeline.refusal_judges``) reads the saved completions of every condition, so
changing judges never regenerates them. The default is ``substring``, the paper's phrase list. Each
completion is also measured for degeneracy without a judge (``pipeline.degenerate``: repeated n-grams,
tokens with no letters, optionally the unedited model's loss); a degenerate completion is never counted
as compliance. Per judge and condition: the refusal rate among parsed verdicts with its n and a 95%
Wilson interval, the share judged degenerate, the unparsable count, and an exact McNemar test against the
baseline on the same prompts (``pipeline.stats``). The top-level numbers are the first judge's.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from omegaconf import DictConfig

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.conditions import eval_conditions
from pipeline.degenerate import Thresholds, shares
from pipeline.io import read_json, write_json
from pipeline.judges import judge_checkpoint
from pipeline.refusal_judges import judge_completions, summarize, verdict_records

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> None:
    names = list(cfg.eval.refusal.judges)
    thresholds = Thresholds.from_config(cfg.eval.refusal.degenerate)
    conditions = eval_conditions(cfg.eval.conditions, cfg.eval.sets, cfg.eval.compared)
    completions = {c: read_json(paths.completions(c)) for c in conditions}
    checkpoint = judge_checkpoint("refusal", cfg)
    measures, judged = judge_completions(cfg, completions, checkpoint)
    summaries = {name: summarize({c: [v["verdict"] for v in found] for c, found in by_condition.items()}, conditions)
                 for name, by_condition in judged.items()}
    for name, summary in summaries.items():
        log.info("%s refusal rates: %s", name, summary["refusal_rate"])
    write_json(paths.stage_dir("refusal") / "verdicts.json", verdict_records(completions, measures, judged))
    write_json(paths.metrics("refusal"), {
        "judges": names,
        **summaries[names[0]],
        "by_judge": summaries,
        "degenerate": {"share": shares(measures), "thresholds": asdict(thresholds)},
    })


def main() -> None:
    run_stage("refusal", run)


if __name__ == "__main__":
    main()
