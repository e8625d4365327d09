"""Configuration: ``conf/`` (Hydra) is the source of truth; ``params.yaml`` is composed from it.

``dvc exp run -S model=...`` composes ``conf/`` into ``params.yaml`` itself (DVC's Hydra
integration); ``python -m pipeline.config`` does the same for ``dvc repro`` and after editing
``conf/``. Stages read ``params.yaml`` through ``load_params`` in struct mode, so a misspelt key is
an error rather than a silent default.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import Container, DictConfig, OmegaConf

from pipeline.errors import ConfigError
from pipeline.io import write_text

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DVC_YAML = CONF_DIR.parent / "dvc.yaml"
PARAMS_FILE = Path("params.yaml")
HEADER = "# Generated from conf/ by `python -m pipeline.config` (or `dvc exp run`). Do not edit by hand.\n"


@cache
def dvc_stages(dvc_yaml: Path = DVC_YAML) -> dict[str, dict]:
    """The stages of the project's ``dvc.yaml`` (none where the package runs without it)."""
    return yaml.safe_load(dvc_yaml.read_text())["stages"] if dvc_yaml.exists() else {}


def stage_params(stage: str, cfg: DictConfig) -> dict[str, Any]:
    """The parameters ``dvc.yaml`` says ``stage`` reads, resolved: all its result may depend on besides code
    and input files (the whole config for a stage ``dvc.yaml`` does not list)."""
    spec = dvc_stages().get(stage)
    if spec is None:
        return OmegaConf.to_container(cfg, resolve=True)
    params = {}
    for key in spec.get("params", []):
        node = OmegaConf.select(cfg, key)
        params[key] = OmegaConf.to_container(node, resolve=True) if isinstance(node, Container) else node
    return params


def available(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def compose_config(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides such as ``model=qwen2.5-coder-0.5b-instruct``."""
    for override in overrides:
        group, _, name = override.partition("=")
        if (conf_dir / group).is_dir() and name and name not in available(group, conf_dir):
            raise ConfigError(f"unknown {group} {name!r}", f"use one of: {', '.join(available(group, conf_dir))}")
    try:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    except HydraException as error:
        raise ConfigError(f"cannot compose conf/: {error}", "check the override names and values") from error
    return cfg


def render_params(cfg: DictConfig) -> str:
    return HEADER + OmegaConf.to_yaml(cfg, resolve=True)


def load_params(path: Path = PARAMS_FILE, overrides: Sequence[str] = ()) -> DictConfig:
    """Read ``params.yaml`` (plus ``key=value`` overrides) as a read-only, struct-mode config."""
    if not path.exists():
        raise ConfigError(f"{path} not found", "run `python -m pipeline.config` to compose it from conf/")
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    for group in ("model", "data"):
        if group not in cfg or "name" not in cfg[group]:
            raise ConfigError(f"{path} has no {group}.name", "regenerate it with `python -m pipeline.config`")
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def main(argv: Sequence[str] | None = None) -> None:
    """Write ``params.yaml`` from ``conf/`` and the given Hydra overrides."""
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        composed = compose_config(overrides)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    write_text(PARAMS_FILE, render_params(composed))
    print(f"wrote {PARAMS_FILE} (model={composed.model.name}, data={composed.data.name})")


if __name__ == "__main__":
    main()
