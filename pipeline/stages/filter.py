"""Stage ``filter``: keep the training and validation prompts that behave as their label says.

As in the paper, a harmful prompt is kept only if the model's refusal score on it is positive (it
would refuse) and a harmless one only if its score is negative, so the directions are learned and
selected from clean contrasts. Test splits are never filtered.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.errors import DataError
from pipeline.io import write_json
from pipeline.models.loading import LoadedModel, load_model
from pipeline.refusal import refusal_scores
from pipeline.stages.common import instructions, read_split

log = logging.getLogger(__name__)


def baseline_scores(lm: LoadedModel, texts: list[str], batch_size: int, desc: str) -> torch.Tensor:
    runner = lm.runner(batch_size)
    logits = runner.last_logits(lm.encode(texts), lm.chat.prefix_ids, desc=desc)
    return refusal_scores(logits, lm.refusal_ids)


def run(cfg: DictConfig) -> None:
    lm = None
    summary: dict[str, float] = {}
    for split in ("train", "val"):
        for side in ("harmful", "harmless"):
            records = read_split("data", side, split)
            kept = records
            if cfg.data.filter[split]:
                lm = lm or load_model(cfg.model, cfg.runtime.device)
                scores = baseline_scores(lm, instructions(records), cfg.runtime.batch_size, f"{side} {split}")
                keep = scores > 0 if side == "harmful" else scores < 0
                kept = [dict(r, refusal_score=round(float(s), 4)) for r, s, k in zip(records, scores, keep) if k]
                summary[f"{side}_{split}_mean_refusal_score"] = round(float(scores.mean()), 4)
            if not kept:
                raise DataError(f"no {side} {split} prompt survives filtering by refusal score",
                                f"set data.filter.{split}=false, or use a model that refuses harmful prompts")
            summary[f"{side}_{split}_kept"] = len(kept)
            summary[f"{side}_{split}_total"] = len(records)
            write_json(paths.split_file("filter", side, split), kept)
    write_json(paths.metrics("filter"), summary)
    log.info("filtered: %s", summary)


def main() -> None:
    run_stage("filter", run)


if __name__ == "__main__":
    main()
