"""Stage ``over_refusal``: does the refusal direction fire on benign prompts that only look sensitive?

XSTest-style prompts ("How do I kill a Python process?") are answered greedily under each registered
intervention in ``eval.over_refusal.interventions`` (baseline, activation addition of ``+r``, the
ablation variants, subtraction; with the ``select`` stage's edit record) and judged by substring
matching (``eval.refusal_substrings``). The paper's
picture predicts that addition raises refusals here and ablation lowers them. The offline set is
``pipeline/data/over_refusal_prompts.json`` (the project's own, 10 categories); a hub source such as
XSTest is a config option (``conf/eval/paper.yaml``). By default a category-balanced sample of
``n_prompts`` keeps the stage cheap on CPU.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict

from omegaconf import DictConfig

from pipeline import paths
from pipeline.checkpoint import Checkpoint
from pipeline.cli import run_stage
from pipeline.conditions import with_compared
from pipeline.data_sources import Record, load_source
from pipeline.errors import DataError
from pipeline.generation import complete_conditions, stop_phrases
from pipeline.interventions import Edits, check_names
from pipeline.io import write_json
from pipeline.models.loading import load_model
from pipeline.refusal import is_refusal, refusal_rate
from pipeline.stages.common import instructions

log = logging.getLogger(__name__)


def balanced_sample(records: list[Record], n: int | None, seed: int) -> list[Record]:
    """``n`` records taken round-robin over categories (each shuffled with ``seed``); all if ``n`` is None."""
    if n is None or n >= len(records):
        return list(records)
    by_category: dict[str | None, list[Record]] = defaultdict(list)
    for record in records:
        by_category[record["category"]].append(record)
    rng = random.Random(seed)
    groups = [by_category[c] for c in sorted(by_category, key=str)]
    queues = [rng.sample(group, len(group)) for group in groups]
    sample: list[Record] = []
    while len(sample) < n:
        for queue in queues:
            if queue and len(sample) < n:
                sample.append(queue.pop(0))
    return sample


def rates_by_category(records: list[Record], flags: dict[str, list[bool]]) -> dict[str, dict[str, float]]:
    """Refusal rate of each intervention within each category."""
    out: dict[str, dict[str, float]] = {}
    for category in sorted({str(r["category"]) for r in records}):
        rows = [i for i, r in enumerate(records) if str(r["category"]) == category]
        out[category] = {kind: round(refusal_rate([f[i] for i in rows]), 4) for kind, f in flags.items()}
    return out


def run(cfg: DictConfig) -> None:
    oc = cfg.eval.over_refusal
    kinds = with_compared(oc.interventions, cfg.eval.compared)
    check_names(kinds, "eval.over_refusal.interventions / eval.compared")
    stop_at = stop_phrases(cfg.eval.stop_policy, cfg.eval.refusal_substrings)
    records = balanced_sample(load_source(oc.source, cfg.data), oc.n_prompts, oc.seed)
    if not records:
        raise DataError("the over-refusal prompt set is empty", "check eval.over_refusal.source")
    lm = load_model(cfg.model, cfg.runtime.device)
    edits = Edits.load(lm, kinds, cfg.eval.edit)
    substrings = list(cfg.eval.refusal_substrings)
    checkpoint = Checkpoint.open("over_refusal", cfg, [], kept=True)
    flags: dict[str, list[bool]] = {}
    found = complete_conditions(lm, edits, {kind: (kind, instructions(records)) for kind in kinds}, oc.max_new_tokens,
                                cfg.eval.batch_size, "over-refusal", checkpoint, stop_at)
    for kind, responses in found.items():
        flags[kind] = [is_refusal(text, substrings) for text in responses]
        write_json(paths.stage_dir("over_refusal") / f"{kind}.json", [
            {"instruction": r["instruction"], "category": r["category"], "response": text, "refusal": flag}
            for r, text, flag in zip(records, responses, flags[kind], strict=True)
        ])
        log.info("over-refusal %s: %.3f", kind, refusal_rate(flags[kind]))
    rates = {kind: round(refusal_rate(f), 4) for kind, f in flags.items()}
    deltas = {k: round(v - rates["baseline"], 4) for k, v in rates.items() if k != "baseline"} \
        if "baseline" in rates else {}
    write_json(paths.metrics("over_refusal"), {
        "refusal_rate": rates,
        "delta_vs_baseline": deltas,
        "refusal_rate_by_category": rates_by_category(records, flags),
        "n_prompts": len(records),
    })


def main() -> None:
    run_stage("over_refusal", run)


if __name__ == "__main__":
    main()
