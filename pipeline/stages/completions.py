"""Stage ``completions``: greedy completions of the test prompts under each configured condition.

A condition (``eval.conditions``) is a test prompt set (``harmful`` / ``harmless``, or an extra
evaluation set of ``eval.sets``, each of which adds its own conditions) and a registered
intervention (``pipeline.interventions``) applied with the edit record of ``eval.edit`` (or of the stage
a ``<intervention>@<stage>`` reference names): by
default the harmful test prompts under baseline, the paper's ablation, its projected and norm-preserving
variants and activation subtraction, the harmless ones under baseline and activation addition. The
number of new tokens is ``eval.max_new_tokens`` (the paper used 512; the CPU default only needs enough
to judge refusal); ``eval.stop_policy`` says when a completion may end earlier (``pipeline.generation``).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from pipeline import paths
from pipeline.checkpoint import Checkpoint
from pipeline.cli import run_stage
from pipeline.conditions import eval_conditions, prompt_files, read_prompts
from pipeline.generation import complete_conditions, stop_phrases
from pipeline.interventions import Edits, check_names
from pipeline.io import write_json
from pipeline.models.loading import load_model
from pipeline.stages.common import instructions

log = logging.getLogger(__name__)

def run(cfg: DictConfig) -> None:
    todo = eval_conditions(cfg.eval.conditions, cfg.eval.sets, cfg.eval.compared)
    check_names([name for _, name in todo.values()], "eval.conditions")
    stop_at = stop_phrases(cfg.eval.stop_policy, cfg.eval.refusal_substrings)
    lm = load_model(cfg.model, cfg.runtime.device)
    edits = Edits.load(lm, [name for _, name in todo.values()], cfg.eval.edit)
    inputs = prompt_files(side for side, _ in todo.values())
    checkpoint = Checkpoint.open("completions", cfg, inputs, kept=True)
    records = {side: read_prompts(side) for side in dict.fromkeys(side for side, _ in todo.values())}
    jobs = {condition: (name, instructions(records[side])) for condition, (side, name) in todo.items()}
    found = complete_conditions(lm, edits, jobs, cfg.eval.max_new_tokens, cfg.eval.batch_size, "completions",
                                checkpoint, stop_at)
    for condition, (side, _) in todo.items():
        responses = found[condition]
        write_json(paths.completions(condition), [
            {"instruction": r["instruction"], "category": r["category"], "response": text}
            for r, text in zip(records[side], responses, strict=True)
        ])
        log.info("%s: %d completions", condition, len(responses))


def main() -> None:
    run_stage("completions", run)


if __name__ == "__main__":
    main()
