"""The edit record: what a direction method decided, in one small versioned artifact every evaluation reads.

A method (the paper's difference in means with its selection, a search, ...) writes an ``Edit``; the
interventions (``pipeline.interventions``) turn it into hooks or weight edits. It holds

* ``directions``: a ``[k, d_model]`` basis (``k`` = 1 for the paper's single direction; ablation
  removes the subspace they span), or, with ``per_layer``, one direction per block ``[n_layers, d_model]``
  (block ``l``'s writes lose ``directions[l]``, read where they go: the residual stream entering block
  ``l + 1``; the embedding loses ``directions[0]``);
* ``attention_weights`` / ``mlp_weights`` ``[n_layers]``: how much of the direction each block's
  attention / MLP write loses under ``weighted_ablation`` (1 everywhere is the paper's ablation),
  and ``embedding_weight`` for the token embedding;
* ``harmless_mean`` ``[d_model]`` (optional): the mean harmless activation where the direction was read,
  which ``projected_ablation`` makes the direction orthogonal to;
* the addition site and coefficient (activation addition adds ``coeff * direction``, unnormalised);
* provenance: the method, its parameters, the stage that wrote it.

On disk: ``edit.safetensors`` (tensors, with the JSON in its header) and ``edit.json`` (the same
JSON, for people and for DVC's params-like diffs).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pipeline import paths
from pipeline.errors import ConfigError
from pipeline.io import load_tensors, read_json, save_tensors, write_json

VERSION = 1
TENSORS = ("directions", "attention_weights", "mlp_weights", "harmless_mean")


@dataclass(frozen=True)
class Kernel:
    """A per-layer weight profile: ``peak`` at layer ``position``, falling linearly to ``floor`` at
    ``width`` layers away, zero beyond (``width`` None: ``peak`` everywhere)."""

    peak: float = 1.0
    position: float = 0.0
    floor: float = 1.0
    width: float | None = None

    def weights(self, n_layers: int) -> torch.Tensor:
        if self.width is None:
            return torch.full((n_layers,), float(self.peak))
        if not self.width > 0:
            raise ConfigError(f"kernel width {self.width}", "use a positive width (in layers), or null for all layers")
        distance = (torch.arange(n_layers, dtype=torch.float32) - self.position).abs()
        slope = (self.peak - self.floor) / self.width
        return torch.where(distance <= self.width, self.peak - slope * distance, torch.zeros(()))


@dataclass(frozen=True)
class Edit:
    directions: torch.Tensor
    layer: int
    n_layers: int
    attention_weights: torch.Tensor
    mlp_weights: torch.Tensor
    embedding_weight: float = 1.0
    per_layer: bool = False
    harmless_mean: torch.Tensor | None = None
    addition_layer: int | None = None
    addition_coeff: float = 1.0
    position: int | None = None
    position_label: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, directions: torch.Tensor, layer: int, n_layers: int, **kwargs) -> Edit:
        """Direction(s) ``[d]`` or ``[k, d]`` read at ``layer``, ablated everywhere at full strength and added
        at ``layer`` unless ``kwargs`` say otherwise (the paper's edit)."""
        weights = {name: kwargs.pop(name, torch.ones(n_layers)) for name in ("attention_weights", "mlp_weights")}
        return cls(directions.float().reshape(-1, directions.shape[-1]), layer, n_layers, **weights,
                   addition_layer=kwargs.pop("addition_layer", layer), **kwargs)

    @property
    def d_model(self) -> int:
        return self.directions.shape[-1]

    @property
    def direction(self) -> torch.Tensor:
        """The direction read at ``layer``, unnormalised: what activation addition adds and readouts project on.
        The first (or only) one of a basis; of per-layer directions, the one read at ``layer`` (block
        ``layer - 1``'s)."""
        return self.directions[self.layer - 1] if self.per_layer else self.directions[0]

    def with_directions(self, directions: torch.Tensor) -> Edit:
        return replace(self, directions=directions)

    def metadata(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_directions": self.directions.shape[0],
            "per_layer": self.per_layer,
            "layer": self.layer,
            "position": self.position,
            "position_label": self.position_label,
            "norm": round(float(self.direction.norm()), 6),
            "embedding_weight": self.embedding_weight,
            "addition": {"layer": self.addition_layer, "coeff": self.addition_coeff},
            "provenance": self.provenance,
        }

    def digest(self) -> str:
        """A hash of the whole record, tensors and metadata: results kept for one record serve no other."""
        digest = hashlib.sha256(json.dumps(self.metadata(), sort_keys=True, default=str).encode())
        for name in TENSORS:
            if (tensor := getattr(self, name)) is not None:
                digest.update(name.encode() + tensor.float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def validate(self) -> None:
        """Shapes that fit together; every problem names the file to regenerate."""
        problems = []
        if self.directions.dim() != 2 or not self.directions.shape[0]:
            problems.append(f"directions have shape {tuple(self.directions.shape)}, expected [k, d_model]")
        elif self.per_layer and self.directions.shape[0] != self.n_layers:
            problems.append(f"per-layer directions: {self.directions.shape[0]} rows for {self.n_layers} layers")
        if self.per_layer and not 1 <= self.layer <= self.n_layers:
            problems.append(f"per-layer directions read at layer {self.layer}: they are read after a block "
                            f"(1..{self.n_layers})")
        for name in ("attention_weights", "mlp_weights"):
            if tuple(getattr(self, name).shape) != (self.n_layers,):
                problems.append(f"{name} has shape {tuple(getattr(self, name).shape)}, expected ({self.n_layers},)")
        if self.harmless_mean is not None and tuple(self.harmless_mean.shape) != (self.d_model,):
            problems.append(f"harmless_mean has shape {tuple(self.harmless_mean.shape)}")
        if not math.isfinite(self.addition_coeff) or not math.isfinite(self.embedding_weight):
            problems.append("addition coeff and embedding weight must be finite")
        if problems:
            raise ConfigError(f"malformed edit record: {'; '.join(problems)}",
                              "re-run the stage that wrote it (`dvc repro select`)")


def save_edit(directory: Path, edit: Edit) -> None:
    """Write ``edit.safetensors`` and ``edit.json`` into ``directory``."""
    edit.validate()
    tensors = {name: getattr(edit, name).float().clone() for name in TENSORS if getattr(edit, name) is not None}
    meta = edit.metadata()
    save_tensors(directory / "edit.safetensors", tensors, metadata=meta)
    write_json(directory / "edit.json", meta)


def edit_files(source: str = "select") -> list[Path]:
    """The two files of the edit record written by stage ``source``."""
    return [paths.stage_dir(source) / "edit.safetensors", paths.stage_dir(source) / "edit.json"]


def read_edit(source: str = "select") -> Edit:
    """The edit record written by stage ``source`` (not checked against a model: see ``load_edit``)."""
    tensor_file, json_file = edit_files(source)
    if not tensor_file.exists():
        enable = "; the search writes one only when enabled: `-S search=optuna`" if source == "search" else ""
        raise ConfigError(f"{tensor_file} not found", f"run the {source} stage first (`dvc repro {source}`{enable})")
    meta = read_json(json_file)
    if meta.get("version") != VERSION:
        raise ConfigError(f"{json_file} is edit-record version {meta.get('version')}, this code reads {VERSION}",
                          f"re-run the {source} stage (`dvc repro {source}`)")
    tensors = load_tensors(tensor_file)
    return Edit(
        directions=tensors["directions"], layer=meta["layer"], n_layers=meta["n_layers"],
        attention_weights=tensors["attention_weights"], mlp_weights=tensors["mlp_weights"],
        embedding_weight=meta["embedding_weight"], per_layer=meta["per_layer"],
        harmless_mean=tensors.get("harmless_mean"), addition_layer=meta["addition"]["layer"],
        addition_coeff=meta["addition"]["coeff"], position=meta["position"],
        position_label=meta["position_label"], provenance=meta["provenance"],
    )


def load_edit(lm, source: str = "select") -> Edit:
    """The edit record of stage ``source``, checked against the loaded model ``lm``."""
    edit = read_edit(source)
    fix = f"re-run the {source} stage for this model (`dvc repro {source}`)"
    if edit.d_model != lm.d_model:
        raise ConfigError(f"the edit in artifacts/{source} has directions of size {edit.d_model}, but {lm.name} has "
                          f"d_model={lm.d_model}", fix)
    if edit.n_layers != lm.n_layers:
        raise ConfigError(f"the edit in artifacts/{source} was made for {edit.n_layers} layers, {lm.name} has "
                          f"{lm.n_layers}", fix)
    for name, layer in (("layer", edit.layer), ("addition layer", edit.addition_layer)):
        if layer is not None and not 0 <= layer <= lm.n_layers:
            raise ConfigError(f"the edit's {name} {layer} is outside 0..{lm.n_layers} for {lm.name}", fix)
    edit.validate()
    return edit
