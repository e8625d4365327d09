"""The intervention registry: a name maps to what it does to a model, given an edit record.

Each intervention is a function ``(model, adapter, edit, stacked) -> context manager`` registered with
``@register(name)``; inside the block the model is intervened on, after it the model is as before. An
intervention that can be folded into the weights also registers its ``fold`` (an in-place weight edit),
which the ``orthogonalize`` stage saves and tests compare with the hooks. ``stacked=True`` (selection,
searches) reads a ``[k, d_model]`` edit as ``k`` alternatives, one per block of rows of the batch,
instead of a basis.

Adding one: a function here (or in any module imported by the stages) decorated with ``@register``,
and its name in ``eval.conditions`` / ``eval.loss.interventions`` / ``eval.over_refusal.interventions``.
There a name applies with the edit record of ``eval.edit``; ``<name>@<stage>`` (e.g. ``recorded@search``)
applies with the record of that stage instead (``Edits``).

* ``baseline``: the unmodified model.
* ``ablation``: the paper's directional ablation: every direction of the edit projected out at every
  block input and every attention / MLP output.
* ``projected_ablation``: the direction is first made orthogonal to the mean harmless activation at
  its layer (so ablation leaves the harmless mean untouched), then ablated as in the paper.
* ``weighted_ablation``: per-layer strengths (the edit's attention / MLP weights and embedding weight).
* ``norm_preserving_ablation``: the weight edit that removes the direction from every residual writer
  (with the edit's per-layer weights) and rescales each edited vector to its original norm; as hooks,
  each output projection's input features are scaled so the columns they weigh keep their norms.
* ``addition`` / ``subtraction``: activation addition of ``±coeff · r`` at the edit's addition layer.
* ``recorded``: the intervention the edit record names: a search trial's own (``weighted_ablation`` or
  ``norm_preserving_ablation``, with its kernel), the paper's ``ablation`` for a record that names none.
  With ``eval.edit=search`` it evaluates the chosen trial as the search measured it, where ``ablation``
  would remove the trial's direction at full strength.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from pipeline.edit import Edit, load_edit
from pipeline.errors import ConfigError, PipelineError
from pipeline.hooks import acting_on_rows, activation_addition, directional_ablation, unit, weighted_ablation
from pipeline.models.adapters import ModelAdapter
from pipeline.weight_edits import edited_in_place, fold_ablation

EDIT_SOURCES = ("select", "search")  # the stages whose edit records an intervention reference may name
Hooks = Callable[[nn.Module, ModelAdapter, Edit, bool], AbstractContextManager]
Fold = Callable[[nn.Module, ModelAdapter, Edit], bool]


@dataclass(frozen=True)
class Intervention:
    name: str
    hooks: Hooks | None  # None: only as a weight edit (applied in place, undone on exit)
    fold: Fold | None  # None: cannot be folded into the weights
    doc: str

    def __call__(self, model: nn.Module, adapter: ModelAdapter, edit: Edit,
                 stacked: bool = False) -> AbstractContextManager:
        if self.hooks is not None:
            return self.hooks(model, adapter, edit, stacked)
        if stacked:
            raise ConfigError(f"{self.name} is a weight edit and cannot score stacked alternatives",
                              "use a hook intervention (e.g. ablation) for selection and searches")
        return _folded(model, adapter, edit, self.fold)


INTERVENTIONS: dict[str, Intervention] = {}


def register(name: str, fold: Fold | None = None, doc: str | None = None):
    """Decorator: make a hooks function available as intervention ``name`` (with its weight ``fold``, if
    it has one). A pure weight edit registers ``None`` as its hooks: ``register(name, fold=...)(None)``."""

    def wrap(hooks: Hooks | None) -> Hooks | None:
        INTERVENTIONS[name] = Intervention(name, hooks, fold, doc or (hooks.__doc__ or "").strip())
        return hooks

    return wrap


def get_intervention(name: str) -> Intervention:
    if name not in INTERVENTIONS:
        raise ConfigError(f"unknown intervention {name!r}", f"use one of: {', '.join(INTERVENTIONS)}")
    return INTERVENTIONS[name]


def split_reference(reference: str, default: str) -> tuple[str, str]:
    """An intervention as the evaluation configs name it: ``ablation`` applies with the edit record of
    ``default`` (``eval.edit``), ``recorded@search`` with the record of the stage after ``@``, so one run
    evaluates two edits (the paper's and a search's chosen trial) side by side."""
    name, _, source = reference.partition("@")
    return name, source or default


def check_names(references, where: str) -> None:
    """Fail before any work if a configured intervention is not registered or names an unknown edit source."""
    split = [r.partition("@") for r in references]
    unknown = [r for r, (name, _, _) in zip(references, split) if name not in INTERVENTIONS]
    if unknown:
        raise ConfigError(f"unknown intervention(s) {unknown} in {where}", f"use some of: {', '.join(INTERVENTIONS)}")
    bad = [r for r, (_, at, source) in zip(references, split) if at and source not in EDIT_SOURCES]
    if bad:
        raise ConfigError(f"{bad} in {where} name an edit record no stage writes",
                          f"write <intervention>@<stage> with a stage of: {', '.join(EDIT_SOURCES)}")


def recorded_name(provenance: dict) -> str:
    """The intervention an edit record's method chose (a search's trial records it), else the paper's ``ablation``."""
    return provenance.get("intervention", "ablation")


def folded_name(configured: str, provenance: dict) -> str:
    """The intervention ``orthogonalize.intervention`` names: ``auto`` is the edit record's own (``recorded_name``)."""
    return recorded_name(provenance) if configured == "auto" else configured


def apply(lm, name: str, edit: Edit, stacked: bool = False) -> AbstractContextManager:
    """Intervention ``name`` with ``edit`` on a loaded model, for the duration of a ``with`` block."""
    return get_intervention(name)(lm.model, lm.adapter, edit, stacked)


class Edits:
    """The edit records a stage's intervention references need (``split_reference``), by source stage."""

    def __init__(self, lm, records: dict[str, Edit], default: str) -> None:
        self.lm, self.records, self.default = lm, records, default

    @classmethod
    def load(cls, lm, references, default: str) -> Edits:
        """Each record the references name (and ``default``'s) loaded once and checked against ``lm``."""
        sources = dict.fromkeys([default, *(split_reference(r, default)[1] for r in references)])
        return cls(lm, {source: load_edit(lm, source) for source in sources}, default)

    def digest(self, reference: str) -> str:
        """A hash of the record ``reference`` reads (``Edit.digest``): results kept for a condition serve only
        that record."""
        return self.records[split_reference(reference, self.default)[1]].digest()

    def apply(self, reference: str) -> AbstractContextManager:
        """The referenced intervention with its edit record, for the duration of a ``with`` block."""
        name, source = split_reference(reference, self.default)
        return apply(self.lm, name, self.records[source])

    def acts_through_hooks(self, reference: str) -> bool:
        """Whether the referenced intervention is hooks (it can then act on some rows of a batch and share
        it with other conditions), not a weight edit (which changes the model for every row)."""
        name, source = split_reference(reference, self.default)
        intervention = get_intervention(name)
        if intervention.name == "recorded":
            intervention = _recorded(self.records[source])
        return intervention.hooks is not None


@contextlib.contextmanager
def _folded(model: nn.Module, adapter: ModelAdapter, edit: Edit, fold: Fold):
    if acting_on_rows():
        raise RuntimeError("a weight edit cannot act on some rows of a batch: run its condition alone "
                           "(Edits.acts_through_hooks)")
    with edited_in_place(model, adapter):
        fold(model, adapter, edit)
        yield


def projected(edit: Edit) -> Edit:
    """The edit with each direction made orthogonal to the mean harmless activation at its layer."""
    if edit.harmless_mean is None:
        raise ConfigError("projected_ablation needs the harmless mean activation in the edit record",
                          "re-run the select stage (it stores it), or drop projected_ablation from eval")
    return edit.with_directions(orthogonal_to(edit.directions, edit.harmless_mean))


def orthogonal_to(directions: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``directions`` ``[k, d]`` with their component along ``means`` removed: one mean ``[d]`` for all, or one
    per row ``[k, d]``."""
    m = unit(means)
    return directions.float() - (directions.float() * m).sum(dim=-1, keepdim=True) * m


def _ones(edit: Edit) -> dict:
    return {"attention_weights": torch.ones(edit.n_layers), "mlp_weights": torch.ones(edit.n_layers),
            "embedding_weight": 1.0}


def _fold(model: nn.Module, adapter: ModelAdapter, edit: Edit, weighted: bool = False,
          norm_preserving: bool = False) -> bool:
    """Fold the edit's ablation into the weights: full strength, or the edit's per-layer weights."""
    weights = ({"attention_weights": edit.attention_weights, "mlp_weights": edit.mlp_weights,
                "embedding_weight": edit.embedding_weight} if weighted else _ones(edit))
    return fold_ablation(model, adapter, edit.directions, per_layer=edit.per_layer, norm_preserving=norm_preserving,
                         **weights)


@register("baseline")
def baseline(model, adapter, edit, stacked=False):
    """The unmodified model."""
    return contextlib.nullcontext()


@register("ablation", fold=_fold)
def ablation(model, adapter, edit, stacked=False):
    """The paper's directional ablation at every layer and position."""
    if edit.per_layer:
        return weighted_ablation(model, adapter, edit.directions, per_layer=True, **_ones(edit))
    return directional_ablation(model, adapter, edit.directions, stacked=stacked)


@register("projected_ablation", fold=lambda model, adapter, edit: _fold(model, adapter, projected(edit)))
def projected_ablation(model, adapter, edit, stacked=False):
    """Directional ablation of the direction made orthogonal to the harmless mean at its layer."""
    return ablation(model, adapter, projected(edit), stacked)


@register("weighted_ablation", fold=partial(_fold, weighted=True))
def weighted(model, adapter, edit, stacked=False):
    """Ablation with per-layer strengths for attention and MLP writes (the edit's kernel weights)."""
    if stacked:
        raise ConfigError("weighted_ablation does not stack alternatives", "score candidates with ablation")
    return weighted_ablation(model, adapter, edit.directions, edit.attention_weights, edit.mlp_weights,
                             edit.embedding_weight, edit.per_layer)


@register("norm_preserving_ablation", fold=partial(_fold, weighted=True, norm_preserving=True))
def norm_preserving(model, adapter, edit, stacked=False):
    """The direction removed from every residual writer (with the edit's per-layer weights, 1 everywhere unless a
    search set them), each written vector keeping its norm: hooks that give what the folded weights give."""
    if stacked:
        raise ConfigError("norm_preserving_ablation does not stack alternatives", "score candidates with ablation")
    blocker = adapter.orthogonalization_blocker()
    if blocker:
        raise PipelineError(f"norm-preserving ablation is defined on the weights, not exact for this family: {blocker}",
                            "use ablation or weighted_ablation for this model")
    return weighted_ablation(model, adapter, edit.directions, edit.attention_weights, edit.mlp_weights,
                             edit.embedding_weight, edit.per_layer, norm_preserving=True)


def _addition(sign: float) -> Hooks:
    def hooks(model, adapter, edit, stacked=False):
        if edit.addition_layer is None:
            raise ConfigError("the edit record has no addition layer", "re-run the stage that wrote it")
        vector = edit.directions if stacked else edit.direction
        return activation_addition(model, adapter, vector, edit.addition_layer, sign * edit.addition_coeff,
                                   stacked=stacked)

    return hooks


def _recorded(edit: Edit) -> Intervention:
    target = get_intervention(recorded_name(edit.provenance))
    if target.name == "recorded":
        raise ConfigError("the edit record names `recorded` as its own intervention", "re-run the stage that wrote it")
    return target


def _recorded_fold(model: nn.Module, adapter: ModelAdapter, edit: Edit) -> bool:
    target = _recorded(edit)
    if target.fold is None:
        raise ConfigError(f"the edit record's intervention {target.name} cannot be folded into the weights",
                          "evaluate it with hooks, or set orthogonalize.intervention to a foldable one")
    return target.fold(model, adapter, edit)


@register("recorded", fold=_recorded_fold)
def recorded(model, adapter, edit, stacked=False):
    """The intervention the edit record names (a search trial's own, with its kernel); else the paper's ablation."""
    return _recorded(edit)(model, adapter, edit, stacked)


register("addition", doc="Activation addition of +coeff·r at the edit's addition layer.")(_addition(+1.0))
register("subtraction", doc="Activation addition of -coeff·r at the edit's addition layer.")(_addition(-1.0))
