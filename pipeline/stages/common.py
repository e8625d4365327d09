"""Small helpers shared by stage entry points: reading splits and the chosen direction."""

from __future__ import annotations

import torch

from pipeline import paths
from pipeline.errors import ConfigError, DataError
from pipeline.io import load_tensors, read_json
from pipeline.models.loading import LoadedModel


def read_split(stage: str, side: str, split: str) -> list[dict]:
    """Records of one split as written by ``stage`` (``data`` or ``filter``)."""
    records = read_json(paths.split_file(stage, side, split))
    if not records:
        raise DataError(f"{paths.split_file(stage, side, split)} is empty",
                        "enlarge the split in conf/data or disable data.filter for it")
    return records


def instructions(records: list[dict]) -> list[str]:
    return [r["instruction"] for r in records]


def chosen_direction(lm: LoadedModel) -> tuple[torch.Tensor, dict]:
    """The selected direction (``[d_model]``, float32) and its metadata, checked against ``lm``."""
    meta = read_json(paths.stage_dir("select") / "direction.json")
    direction = load_tensors(paths.stage_dir("select") / "direction.safetensors")["direction"]
    if direction.shape != (lm.d_model,):
        raise ConfigError(
            f"the direction in artifacts/select has shape {tuple(direction.shape)}, but {lm.name} has "
            f"d_model={lm.d_model}", "re-run the select stage for this model (`dvc repro select`)")
    if not 0 <= meta["layer"] <= lm.n_layers:
        raise ConfigError(f"the direction's layer {meta['layer']} is outside 0..{lm.n_layers} for {lm.name}",
                          "re-run the select stage for this model (`dvc repro select`)")
    return direction, meta
