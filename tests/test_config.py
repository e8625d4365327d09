"""conf/ is the source of truth: params.yaml is its composition, and every option composes."""

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline import paths
from pipeline.config import available, compose_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_yaml_is_the_default_composition():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == OmegaConf.to_container(compose_config(), resolve=True), \
        "params.yaml is stale: run `python -m pipeline.config`"


@pytest.mark.parametrize("group", ["model", "data", "select", "eval", "analysis"])
def test_every_option_composes(group):
    for option in available(group):
        cfg = compose_config([f"{group}={option}"])
        assert cfg[group].name == option


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="use one of: .*qwen2.5-coder-1.5b-instruct"):
        compose_config(["model=no-such-model"])
    with pytest.raises(ConfigError, match="use one of: .*offline"):
        compose_config(["data=nope"])


def test_dvc_yaml_declares_the_paths_the_stages_write():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    from pipeline.stages import STAGES

    assert list(dvc) == list(STAGES)
    for stage in STAGES:
        assert dvc[stage]["cmd"] == f"python -m pipeline.stages.{stage}"
        outs = [o if isinstance(o, str) else next(iter(o)) for o in dvc[stage].get("outs", [])]
        assert str(paths.timing(stage)) in outs
        metrics = [next(iter(m)) for m in dvc[stage].get("metrics", [])]
        writes_metrics = f'paths.metrics("{stage}")' in (ROOT / "pipeline" / "stages" / f"{stage}.py").read_text()
        assert (str(paths.metrics(stage)) in metrics) == writes_metrics, stage
