"""Stage ``completions``: greedy completions of the test prompts under each intervention.

Harmful test prompts: baseline, directional ablation, activation subtraction (``-r`` at the chosen
layer). Harmless test prompts: baseline, activation addition (``+r``). The number of new tokens is
``eval.max_new_tokens`` (the paper used 512; the CPU default only needs enough to judge refusal).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline import paths
from pipeline.checkpoint import Checkpoint
from pipeline.cli import run_stage
from pipeline.interventions import intervention
from pipeline.io import write_json
from pipeline.models.loading import LoadedModel, load_model
from pipeline.stages.common import chosen_direction, instructions, read_split

log = logging.getLogger(__name__)

# condition name -> (prompt set, intervention)
CONDITIONS = {
    "harmful_baseline": ("harmful", "baseline"),
    "harmful_ablation": ("harmful", "ablation"),
    "harmful_subtraction": ("harmful", "subtraction"),
    "harmless_baseline": ("harmless", "baseline"),
    "harmless_addition": ("harmless", "addition"),
}


def complete(lm: LoadedModel, texts: list[str], max_new_tokens: int, batch_size: int, desc: str,
             store: Checkpoint | None = None) -> list[str]:
    """Greedy completions, decoded and stripped; ``store`` makes finished batches survive a kill."""
    return complete_ids(lm, lm.encode(texts), max_new_tokens, batch_size, desc, store)


def complete_ids(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str,
                 store: Checkpoint | None = None) -> list[str]:
    """``complete`` for prompts already encoded (``lm.encode``, e.g. with an adversarial suffix's ids)."""
    runner = lm.runner(batch_size)
    tokens = runner.generate(prompts, lm.chat.prefix_ids, max_new_tokens, lm.eos_ids, desc=desc, store=store)
    return [lm.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def run(cfg: DictConfig) -> None:
    lm = load_model(cfg.model, cfg.runtime.device)
    direction, meta = chosen_direction(lm)
    inputs = [paths.split_file("data", side, "test") for side in ("harmful", "harmless")]
    checkpoint = Checkpoint.open("completions", cfg, [*inputs, paths.stage_dir("select") / "direction.safetensors"])
    for condition, (side, kind) in CONDITIONS.items():
        records = read_split("data", side, "test")
        with intervention(lm, kind, direction, meta["layer"]):
            responses = complete(lm, instructions(records), cfg.eval.max_new_tokens, cfg.eval.batch_size, condition,
                                 checkpoint.scope(condition))
        write_json(paths.completions(condition), [
            {"instruction": r["instruction"], "category": r["category"], "response": text}
            for r, text in zip(records, responses)
        ])
        log.info("%s: %d completions", condition, len(responses))
    checkpoint.clear()


def main() -> None:
    run_stage("completions", run)


if __name__ == "__main__":
    main()
