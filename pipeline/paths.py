"""Where each stage writes, relative to the working directory (the repo, or one sweep job's folder).

``dvc.yaml`` declares the same paths; ``tests/test_dvc_yaml.py`` checks that they agree.
"""

from __future__ import annotations

from pathlib import Path

ARTIFACTS = Path("artifacts")
METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports")


def stage_dir(stage: str) -> Path:
    return ARTIFACTS / stage


def metrics(stage: str) -> Path:
    return METRICS / f"{stage}.json"


def timing(stage: str) -> Path:
    return ARTIFACTS / "timing" / f"{stage}.json"


def split_file(stage: str, side: str, split: str) -> Path:
    """An instruction split, e.g. ``artifacts/data/harmful_train.json``."""
    return stage_dir(stage) / f"{side}_{split}.json"


def eval_set(name: str) -> Path:
    """The prompts of one extra evaluation set (``eval.sets``), e.g. ``artifacts/sets/past_tense.json``."""
    return ARTIFACTS / "sets" / f"{name}.json"


def completions(condition: str) -> Path:
    """Completions of one (prompt set, intervention), e.g. ``harmful_ablation``."""
    return stage_dir("completions") / f"{condition}.json"
