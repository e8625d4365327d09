"""The evaluated conditions: ``eval.conditions`` maps a name to a test prompt set and an intervention, and
each extra evaluation set of ``eval.sets`` adds one condition per intervention it lists.

Kept apart from ``pipeline.interventions`` (which needs torch and the models) so that stages that only
read completions (``refusal``, ``safety``, ``report``) do not depend on the intervention code. The stages
that generate read each condition's prompts through ``read_prompts``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig

from pipeline import paths
from pipeline.errors import ConfigError, DataError
from pipeline.io import read_json
from pipeline.stages.common import read_split

PROMPT_SETS = ("harmful", "harmless")  # the data stage's test splits; ``eval.sets`` adds named sets
RESERVED_SET_NAMES = (*PROMPT_SETS, "index")  # artifacts/sets/index.json lists the sets


def check_set_name(name: str) -> None:
    if name in RESERVED_SET_NAMES:
        raise ConfigError(f"eval.sets.{name}: the names {', '.join(RESERVED_SET_NAMES)} are taken", "rename the set")


def with_compared(interventions: Iterable[str], compared: Iterable[str]) -> list[str]:
    """A stage's configured interventions, then the references of ``eval.compared`` it lacks."""
    return list(dict.fromkeys([*interventions, *compared]))


def eval_conditions(conditions: DictConfig, sets: DictConfig,
                    compared: Iterable[str] = ()) -> dict[str, tuple[str, str]]:
    """``{condition: (prompt set, intervention name)}``: ``eval.conditions``; ``harmful_<reference>`` for each
    reference of ``eval.compared`` (another edit's intervention, e.g. ``recorded@search``) that no harmful
    condition evaluates yet; then ``<set>_<intervention>`` for each intervention of each extra evaluation set
    in ``eval.sets``, compared references included."""
    out = {name: (c.prompts, c.intervention) for name, c in conditions.items()}
    for reference in compared:
        if ("harmful", reference) not in out.values():
            if f"harmful_{reference}" in out:
                raise ConfigError(f"eval.compared adds condition harmful_{reference}, which eval.conditions has "
                                  "with another intervention", "rename that condition")
            out[f"harmful_{reference}"] = ("harmful", reference)
    bad = [name for name, (prompts, _) in out.items() if prompts not in (*PROMPT_SETS, *sets)]
    if bad:
        raise ConfigError(f"eval.conditions {bad}: prompts must be one of {(*PROMPT_SETS, *sets)}",
                          "fix conf/eval, or add the set to eval.sets")
    for name, spec in sets.items():
        check_set_name(name)
        for intervention in with_compared(spec.interventions, compared):
            condition = f"{name}_{intervention}"
            if condition in out:
                raise ConfigError(f"eval.sets.{name} makes condition {condition!r}, which eval.conditions has",
                                  "rename the set or the condition")
            out[condition] = (name, intervention)
    return out


def read_prompts(prompt_set: str) -> list[dict]:
    """The records of a condition's prompt set: a test split (``harmful`` / ``harmless``) or an extra
    evaluation set of ``eval.sets``, as the ``data`` stage wrote them."""
    if prompt_set in PROMPT_SETS:
        return read_split("data", prompt_set, "test")
    path = paths.eval_set(prompt_set)
    if not path.exists():
        raise DataError(f"evaluation set {prompt_set!r} has no prompts at {path}",
                        "run the data stage again (dvc repro data) after adding the set to eval.sets")
    return read_json(path)


def prompt_files(prompt_sets: Iterable[str]) -> list[Path]:
    """The files holding these prompt sets (for checkpoints that must not outlive a change of prompts)."""
    return [paths.split_file("data", s, "test") if s in PROMPT_SETS else paths.eval_set(s)
            for s in dict.fromkeys(prompt_sets)]
