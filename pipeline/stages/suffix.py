"""Stage ``suffix``: an adversarial suffix for the configured model, a random control, and what they do.

The suffix is optimised with GCG (``pipeline.analysis.gcg``) on the first ``analysis.gcg.n_prompts``
filtered harmful *train* prompts (so the analysis prompts, from the validation split, are held out),
or taken from ``analysis.gcg.suffix``. The control is a random suffix of the same token length. Both
are stored as token ids and appended after the instruction's tokens (``ChatFormat.encode``).

Then, for harmful prompts with no suffix / the adversarial one / the random one (held-out validation
prompts, and the optimisation prompts themselves): the refusal score, greedy completions judged by
``eval.refusal_substrings``, and the share of refused prompts that the suffix turns into compliance.

The analysis is opt-in (``analysis=suffix``); with ``analysis=none`` this stage, ``geometry`` and
``heads`` only write a metrics file saying so.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

import pandas as pd
from omegaconf import DictConfig

from pipeline import figures, paths
from pipeline.analysis import gcg
from pipeline.checkpoint import Checkpoint
from pipeline.cli import run_stage
from pipeline.errors import ConfigError
from pipeline.generation import complete_ids, stop_phrases
from pipeline.io import atomic_path, read_json, write_json
from pipeline.models.loading import LoadedModel, load_model
from pipeline.refusal import is_refusal, refusal_scores
from pipeline.stages.common import instructions, read_split

log = logging.getLogger(__name__)

SUFFIX_KINDS = ("adversarial", "random")


@dataclass(frozen=True)
class PromptSet:
    """Prompts of one analysis set, encoded; ``n_suffix`` suffix tokens sit before the post-instruction tokens."""

    instructions: list[str]
    ids: list[list[int]]
    n_suffix: int = 0


def analysis_disabled(cfg: DictConfig, stage: str) -> bool:
    """With ``analysis.enabled`` false: leave the stage's outputs empty, say so in its metrics, return True."""
    if cfg.analysis.enabled:
        return False
    for out in (paths.stage_dir(stage), paths.PLOTS / stage):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    write_json(paths.metrics(stage), {"enabled": False})
    log.info("stage %s skipped: the suffix analysis is off (enable it with `dvc exp run -S analysis=suffix`)", stage)
    return True


def read_suffixes() -> dict:
    return read_json(paths.stage_dir("suffix") / "suffix.json")


def prompt_sets(lm: LoadedModel, cfg: DictConfig, record: dict, harmless: bool = True) -> dict[str, PromptSet]:
    """The analysis sets: held-out harmful prompts (``harmful``) and the optimisation prompts (``optimised``,
    when the suffix was optimised), each alone and with each suffix (``<group>_<kind>``), then ``harmless``."""
    limit = cfg.analysis.prompts.max_prompts
    groups = {"harmful": instructions(read_split("filter", "harmful", "val"))[:limit]}
    if record["optimised_on"]:
        groups["optimised"] = record["optimised_on"]
    sets = {}
    for group, texts in groups.items():
        sets[group] = PromptSet(texts, lm.encode(texts))
        for kind in SUFFIX_KINDS:
            ids = record[kind]["ids"]
            sets[f"{group}_{kind}"] = PromptSet(texts, lm.encode(texts, ids), len(ids))
    if harmless:
        texts = instructions(read_split("filter", "harmless", "val"))[:limit]
        sets["harmless"] = PromptSet(texts, lm.encode(texts))
    return sets


def style(name: str) -> tuple[str, str]:
    """(colour, line style) of a prompt set in the analysis figures: colour by suffix, dashed for the
    optimisation prompts."""
    colour = {"adversarial": "tab:purple", "random": "tab:orange"}.get(name.rsplit("_", 1)[-1], "tab:red")
    if name == "harmless":
        colour = "tab:blue"
    return colour, "--" if name.startswith("optimised") else "-"


def adversarial_suffix(lm: LoadedModel, cfg: DictConfig, allowed, store: Checkpoint) -> tuple[list[int], dict]:
    """The configured suffix's ids, or GCG's on the first ``n_prompts`` harmful train prompts; and a record."""
    settings = cfg.analysis.gcg
    if settings.suffix is not None:
        ids = lm.tokenizer(settings.suffix, add_special_tokens=False).input_ids
        if not ids:
            raise ConfigError("analysis.gcg.suffix encodes to no tokens",
                              "give a non-empty suffix, or null to optimise one")
        return ids, {"source": "config", "optimised_on": []}
    texts = instructions(read_split("filter", "harmful", "train"))[: settings.n_prompts]
    init = lm.tokenizer(settings.init, add_special_tokens=False).input_ids
    target = lm.tokenizer(settings.target, add_special_tokens=False).input_ids
    if not init or not target:
        raise ConfigError("analysis.gcg.init or analysis.gcg.target encodes to no tokens", "set both to non-empty text")
    n_post = lm.chat.n_post_instruction
    objective = gcg.TargetLoss(lm, [p[:-n_post] for p in lm.encode(texts)], lm.chat.suffix_ids, target)
    result = gcg.optimise(objective, init, allowed, gcg.Settings(
        steps=settings.steps, search_width=settings.search_width, top_k=settings.top_k, seed=settings.seed,
        early_stop=settings.early_stop, checkpoint_every=settings.checkpoint_every,
        batch_size=cfg.runtime.batch_size), store)
    return result.ids, {"source": "gcg", "optimised_on": texts, "target": settings.target, "loss": result.loss,
                        "losses": result.losses, "steps_run": len(result.losses) - 1,
                        "reached_target": result.reached_target}


def flipped(refused: list[bool], refused_with_suffix: list[bool]) -> float | None:
    """Share of the prompts refused without the suffix that are answered with it (None if none was refused)."""
    pairs = [after for before, after in zip(refused, refused_with_suffix) if before]
    return round(sum(not after for after in pairs) / len(pairs), 4) if pairs else None


def run(cfg: DictConfig) -> None:
    if analysis_disabled(cfg, "suffix"):
        return
    lm = load_model(cfg.model, cfg.runtime.device)
    out = paths.stage_dir("suffix")
    splits = [paths.split_file("filter", side, split) for side in ("harmful", "harmless") for split in ("train", "val")]
    checkpoint = Checkpoint.open("suffix", cfg, splits)
    allowed = gcg.allowed_tokens(lm.tokenizer, lm.adapter.embedding(lm.model).weight.shape[0])
    ids, record = adversarial_suffix(lm, cfg, allowed, checkpoint.scope("gcg"))
    control = gcg.random_suffix(allowed, len(ids), cfg.analysis.gcg.seed)
    record.update({kind: {"ids": i, "text": lm.tokenizer.decode(i)} for kind, i in zip(SUFFIX_KINDS, (ids, control))})
    write_json(out / "suffix.json", record)
    log.info("adversarial suffix (%s, %d tokens): %r", record["source"], len(ids), record["adversarial"]["text"])

    sets = prompt_sets(lm, cfg, record, harmless=False)
    runner = lm.runner(cfg.runtime.batch_size)
    substrings = list(cfg.eval.refusal_substrings)
    stop_at = stop_phrases(cfg.eval.stop_policy, substrings)
    scores, verdicts, refused = {}, {}, {}
    for name, prompts in sets.items():
        logits = runner.last_logits(prompts.ids, lm.chat.prefix_ids, desc=f"refusal score {name}")
        scores[name] = round(float(refusal_scores(logits, lm.refusal_ids).mean()), 4)
        responses = complete_ids(lm, prompts.ids, cfg.eval.max_new_tokens, cfg.eval.batch_size, name,
                                 checkpoint.scope(name), stop_at)
        refused[name] = [is_refusal(r, substrings) for r in responses]
        verdicts[name] = [{"instruction": i, "response": r, "refusal": f}
                          for i, r, f in zip(prompts.instructions, responses, refused[name])]
    write_json(out / "verdicts.json", verdicts)
    metrics = {
        "enabled": True,
        "optimised": record["source"] == "gcg",
        "n_suffix_tokens": len(ids),
        "refusal_rate": {name: round(sum(flags) / len(flags), 4) for name, flags in refused.items()},
        "refusal_score": scores,
        "flipped_to_compliance": {name: flipped(refused[name.rsplit("_", 1)[0]], flags)
                                  for name, flags in refused.items() if name.endswith(SUFFIX_KINDS)},
    }
    if record["source"] == "gcg":
        metrics["gcg"] = {"steps_run": record["steps_run"], "initial_loss": round(record["losses"][0], 4),
                          "best_loss": round(record["loss"], 4), "reached_target": record["reached_target"]}
        losses = pd.DataFrame({"step": range(len(record["losses"])), "loss": record["losses"]})
        with atomic_path(out / "gcg_loss.csv") as tmp:
            losses.to_csv(tmp, index=False)
        figures.loss_curve(losses, f"GCG target loss ({settings_line(cfg)})", paths.PLOTS / "suffix" / "gcg_loss.png")
    else:
        (paths.PLOTS / "suffix").mkdir(parents=True, exist_ok=True)
    write_json(paths.metrics("suffix"), metrics)
    checkpoint.clear()
    log.info("suffix: %s", metrics)


def settings_line(cfg: DictConfig) -> str:
    s = cfg.analysis.gcg
    return (f"{s.n_prompts} prompt(s), width {s.search_width}, top-k {s.top_k}, target {s.target!r}, "
            f"seed {s.seed}")


def main() -> None:
    run_stage("suffix", run)


if __name__ == "__main__":
    main()
