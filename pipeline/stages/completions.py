"""Stage ``completions``: greedy completions of the test prompts under each intervention.

Harmful test prompts: baseline, directional ablation, activation subtraction (``-r`` at the chosen
layer). Harmless test prompts: baseline, activation addition (``+r``). The number of new tokens is
``eval.max_new_tokens`` (the paper used 512; the CPU default only needs enough to judge refusal), and
with ``eval.stop_at_refusal`` a completion ends once it contains a refusal phrase (see ``stop_phrases``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from omegaconf import DictConfig

from pipeline import paths
from pipeline.checkpoint import Checkpoint
from pipeline.cli import run_stage
from pipeline.interventions import intervention
from pipeline.io import write_json
from pipeline.models.loading import LoadedModel, load_model
from pipeline.refusal import is_refusal
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


def stop_phrases(cfg: DictConfig) -> list[str]:
    """Phrases that end a completion early: the refusal phrases when ``eval.stop_at_refusal`` is on.

    A completion is judged a refusal as soon as it contains one of them, so stopping there leaves every
    substring verdict unchanged and saves the tokens after it. Model judges (``eval.safety.judges``) read
    whole completions, so with any configured, completions always run to ``max_new_tokens``.
    """
    if cfg.eval.stop_at_refusal and not cfg.eval.safety.judges:
        return list(cfg.eval.refusal_substrings)
    return []


def complete(lm: LoadedModel, texts: list[str], max_new_tokens: int, batch_size: int, desc: str,
             store: Checkpoint | None = None, stop_at: Sequence[str] = ()) -> list[str]:
    """Greedy completions, decoded and stripped; ``store`` makes finished batches survive a kill, and a
    completion stops once it contains a phrase of ``stop_at``."""
    return complete_ids(lm, lm.encode(texts), max_new_tokens, batch_size, desc, store, stop_at)


def complete_ids(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int, desc: str,
                 store: Checkpoint | None = None, stop_at: Sequence[str] = ()) -> list[str]:
    """``complete`` for prompts already encoded (``lm.encode``, e.g. with an adversarial suffix's ids)."""
    def decode(tokens: list[int]) -> str:
        return lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    stop = (lambda tokens: is_refusal(decode(tokens), stop_at)) if stop_at else None
    tokens = lm.runner(batch_size).generate(prompts, lm.chat.prefix_ids, max_new_tokens, lm.eos_ids, desc=desc,
                                            store=store, stop=stop)
    return [decode(t) for t in tokens]


def run(cfg: DictConfig) -> None:
    lm = load_model(cfg.model, cfg.runtime.device)
    direction, meta = chosen_direction(lm)
    inputs = [paths.split_file("data", side, "test") for side in ("harmful", "harmless")]
    checkpoint = Checkpoint.open("completions", cfg, [*inputs, paths.stage_dir("select") / "direction.safetensors"])
    for condition, (side, kind) in CONDITIONS.items():
        records = read_split("data", side, "test")
        with intervention(lm, kind, direction, meta["layer"]):
            responses = complete(lm, instructions(records), cfg.eval.max_new_tokens, cfg.eval.batch_size, condition,
                                 checkpoint.scope(condition), stop_phrases(cfg))
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
