"""Stage ``delayed_refusal``: how many substring verdicts change when completions are allowed to go on?

For the first ``eval.delayed_refusal.n_prompts`` test prompts of each condition in
``eval.delayed_refusal.conditions``, a greedy completion of ``eval.delayed_refusal.max_new_tokens`` tokens
(stopped early only once it contains a refusal phrase, which settles its substring verdict at every
longer budget), judged cut at each budget of ``budgets`` and at ``eval.max_new_tokens``
(``pipeline.delayed_refusal``). Metrics: the share of verdicts that differ from the long budget's, per
budget and condition, with its 95% interval at the evaluation budget, and the shortest budget at which
fewer than ``max_change`` change.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline import paths
from pipeline.checkpoint import Checkpoint
from pipeline.cli import run_stage
from pipeline.conditions import eval_conditions, prompt_files, read_prompts
from pipeline.delayed_refusal import changed_shares, shortest_stable_budget, verdicts_by_budget
from pipeline.errors import ConfigError
from pipeline.generation import condition_tokens, decode
from pipeline.interventions import Edits, check_names
from pipeline.io import write_json
from pipeline.models.loading import load_model
from pipeline.refusal import is_refusal
from pipeline.stages.common import instructions
from pipeline.stats import wilson_interval

log = logging.getLogger(__name__)


def budgets(cfg: DictConfig) -> list[int]:
    """The configured budgets, the evaluation's and the long one, checked and sorted."""
    long = cfg.eval.delayed_refusal.max_new_tokens
    out = sorted({*cfg.eval.delayed_refusal.budgets, cfg.eval.max_new_tokens, long})
    if out[0] < 1 or out[-1] != long:
        raise ConfigError(f"eval.delayed_refusal budgets {out} must lie in 1..max_new_tokens ({long})",
                          "lower the budgets (or eval.max_new_tokens), or raise eval.delayed_refusal.max_new_tokens")
    return out


def run(cfg: DictConfig) -> None:
    settings = cfg.eval.delayed_refusal
    conditions = eval_conditions(cfg.eval.conditions, cfg.eval.sets, cfg.eval.compared)
    missing = [c for c in settings.conditions if c not in conditions]
    if missing:
        raise ConfigError(f"eval.delayed_refusal.conditions {missing} are not in eval.conditions",
                          f"use some of: {', '.join(conditions)}")
    if settings.n_prompts < 1:
        raise ConfigError(f"eval.delayed_refusal.n_prompts={settings.n_prompts}", "use at least 1")
    names = [conditions[c][1] for c in settings.conditions]
    check_names(names, "eval.conditions")
    cuts = budgets(cfg)
    substrings = list(cfg.eval.refusal_substrings)
    lm = load_model(cfg.model, cfg.runtime.device)
    edits = Edits.load(lm, names, cfg.eval.edit)
    inputs = prompt_files(conditions[c][0] for c in settings.conditions)
    checkpoint = Checkpoint.open("delayed_refusal", cfg, inputs, kept=True)
    records = {c: read_prompts(conditions[c][0])[: settings.n_prompts] for c in settings.conditions}
    jobs = {c: (conditions[c][1], lm.encode(instructions(records[c]))) for c in settings.conditions}
    generated = condition_tokens(lm, edits, jobs, settings.max_new_tokens, cfg.eval.batch_size,
                                 f"to {settings.max_new_tokens} tokens", checkpoint, substrings)
    verdicts: dict[str, dict[int, list[bool]]] = {}
    rows = []
    for condition, tokens in generated.items():
        verdicts[condition] = verdicts_by_budget(tokens, cuts, lambda t: is_refusal(decode(lm, t), substrings))
        rows += [{"condition": condition, "instruction": r["instruction"], "response": decode(lm, t),
                  "tokens": len(t), "refusal_by_budget": {b: verdicts[condition][b][i] for b in cuts}}
                 for i, (r, t) in enumerate(zip(records[condition], tokens, strict=True))]
    pooled = {b: [v for by_budget in verdicts.values() for v in by_budget[b]] for b in cuts}
    shares = changed_shares(pooled, settings.max_new_tokens)
    at_eval = sum(a != b for a, b in zip(pooled[cfg.eval.max_new_tokens], pooled[settings.max_new_tokens]))
    write_json(paths.stage_dir("delayed_refusal") / "completions.json", rows)
    write_json(paths.metrics("delayed_refusal"), {
        "long_budget": settings.max_new_tokens,
        "eval_budget": cfg.eval.max_new_tokens,
        "n": len(pooled[settings.max_new_tokens]),
        "changed_at_eval_budget": at_eval,
        "changed_share_at_eval_budget": round(shares[cfg.eval.max_new_tokens], 4),
        "ci95_at_eval_budget": wilson_interval(at_eval, len(pooled[settings.max_new_tokens])),
        "changed_share": {str(b): round(s, 4) for b, s in shares.items()},
        "by_condition": {c: {str(b): round(s, 4) for b, s in changed_shares(v, settings.max_new_tokens).items()}
                         for c, v in verdicts.items()},
        "max_change": settings.max_change,
        "shortest_stable_budget": shortest_stable_budget(shares, settings.max_change),
    })
    log.info("verdicts that change between %d and %d tokens: %d of %d", cfg.eval.max_new_tokens,
             settings.max_new_tokens, at_eval, len(pooled[settings.max_new_tokens]))


def main() -> None:
    run_stage("delayed_refusal", run)


if __name__ == "__main__":
    main()
