"""Stage ``safety``: model judges (LlamaGuard 2/3, HarmBench's classifier) on the saved completions.

Runs every judge named in ``eval.safety.judges`` (definitions: ``eval.judges``, from
``conf/eval/judge/*.yaml``) over the completions of every condition, and reports the **safety rate**
per condition: the fraction of completions the judge calls safe, among those whose verdict parsed
(unparsable verdicts are counted in ``n_invalid``, never guessed). Each judge's per-item verdicts are
written as soon as it finishes. The completions are read, never regenerated, so changing judges only
re-runs this stage. The default list is empty: the judges are gated hub models that need a GPU.
"""

from __future__ import annotations

import logging
from functools import partial

from omegaconf import DictConfig

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.conditions import eval_conditions
from pipeline.errors import ConfigError
from pipeline.io import read_json, write_json
from pipeline.judges import check_spec, free_memory, judge_checkpoint, judge_conditions, load_judge, loaded_on_first_use

log = logging.getLogger(__name__)


def safety_rate(verdicts: list[dict]) -> tuple[float | None, int]:
    """(fraction judged safe among parsed verdicts, number that did not parse); None if none parsed."""
    parsed = [v["unsafe"] for v in verdicts if v["unsafe"] is not None]
    rate = round(sum(not u for u in parsed) / len(parsed), 4) if parsed else None
    return rate, len(verdicts) - len(parsed)


def run(cfg: DictConfig) -> None:
    names = list(cfg.eval.safety.judges)
    unknown = [n for n in names if n not in cfg.eval.judges]
    if unknown:
        raise ConfigError(f"unknown judge(s) {unknown} in eval.safety.judges",
                          f"use names defined in conf/eval/judge: {', '.join(sorted(cfg.eval.judges))}")
    for name in names:
        check_spec(name, cfg.eval.judges[name])
    out = paths.stage_dir("safety")
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"judges": names, "stop_policy": cfg.eval.stop_policy, "safety_rate": {}, "n_invalid": {}}
    if not names:
        log.info("no model judges configured (eval.safety.judges is empty); see README: Judges")
    elif cfg.eval.stop_policy != "none":
        log.warning("eval.stop_policy=%s: the judges read completions that end at their first refusal phrase; "
                    "set eval.stop_policy=none for whole completions", cfg.eval.stop_policy)
    conditions = eval_conditions(cfg.eval.conditions, cfg.eval.sets, cfg.eval.compared)
    completions = {c: read_json(paths.completions(c)) for c in conditions}
    checkpoint = judge_checkpoint("safety", cfg)
    for name in names:
        judge = loaded_on_first_use(partial(load_judge, name, cfg.eval.judges[name], cfg.runtime.device))
        judged = judge_conditions(judge, completions, desc=name, store=checkpoint.scope(name))
        verdicts = {c: [{**item, **v} for item, v in zip(items, judged[c], strict=True)]
                    for c, items in completions.items()}
        write_json(out / f"{name}.json", verdicts)
        rates = {c: safety_rate(v) for c, v in verdicts.items()}
        metrics["safety_rate"][name] = {c: rate for c, (rate, _) in rates.items()}
        metrics["n_invalid"][name] = {c: invalid for c, (_, invalid) in rates.items()}
        log.info("%s safety rates: %s", name, metrics["safety_rate"][name])
        del judge
        free_memory()
    write_json(paths.metrics("safety"), metrics)


def main() -> None:
    run_stage("safety", run)


if __name__ == "__main__":
    main()
