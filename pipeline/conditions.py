"""The evaluated conditions: ``eval.conditions`` maps a name to a test prompt set and an intervention.

Kept apart from ``pipeline.interventions`` (which needs torch and the models) so that stages that only
read completions (``refusal``, ``safety``, ``report``) do not depend on the intervention code.
"""

from __future__ import annotations

from omegaconf import DictConfig

from pipeline.errors import ConfigError

PROMPT_SETS = ("harmful", "harmless")


def eval_conditions(conditions: DictConfig) -> dict[str, tuple[str, str]]:
    """``{condition: (test prompt set, intervention name)}`` from ``eval.conditions``."""
    out = {name: (c.prompts, c.intervention) for name, c in conditions.items()}
    bad = [name for name, (prompts, _) in out.items() if prompts not in PROMPT_SETS]
    if bad:
        raise ConfigError(f"eval.conditions {bad}: prompts must be one of {PROMPT_SETS}", "fix conf/eval")
    return out
