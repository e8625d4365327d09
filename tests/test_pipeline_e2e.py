"""A tiny end-to-end `dvc repro` in a temporary copy of the project, then a second one that does nothing."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_project

SECRETS = {"HF_TOKEN": "hf_SENTINELtoken0123456789", "WANDB_API_KEY": "SENTINELwandbkey0123456789abcdef01234567"}


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


@pytest.mark.slow
def test_tiny_dvc_repro_runs_every_stage_then_does_nothing(tmp_path):
    project = make_tiny_project(tmp_path)
    env = {**os.environ, "REFUSAL_CACHE": str(tmp_path / "cache"), "DVC_NO_ANALYTICS": "1", **SECRETS,
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "WANDB_MODE": "disabled",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], project, env)
    _run(["dvc", "init", "-q"], project, env)
    out = _run(["dvc", "repro"], project, env)
    for stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]:
        assert f"Running stage '{stage}'" in out
    judge = json.loads((project / "metrics" / "judge.json").read_text())
    assert set(judge["refusal_rate"]) == {"harmful_baseline", "harmful_ablation", "harmful_subtraction",
                                          "harmless_baseline", "harmless_addition"}
    ortho = json.loads((project / "metrics" / "orthogonalize.json").read_text())
    assert ortho["mean_kl_vs_hooks"] < 1e-4
    assert (project / "artifacts" / "orthogonalized_model" / "config.json").exists()
    assert (project / "reports" / "summary.md").exists()
    assert (project / "plots" / "select" / "bypass_score.png").exists()
    again = _run(["dvc", "repro"], project, env)
    assert "Running stage" not in again
    assert "Data and pipelines are up to date" in again
    # tokens come from the environment and never reach an output, a log or the params
    for path in project.rglob("*"):
        if path.is_file() and ".git" not in path.parts:
            data = path.read_bytes()
            assert not any(secret.encode() in data for secret in SECRETS.values()), path
    assert not any(secret in out + again for secret in SECRETS.values())
