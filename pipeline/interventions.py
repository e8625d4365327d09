"""Named interventions with the chosen direction, shared by the evaluation stages.

* ``baseline``: the unmodified model.
* ``ablation``: directional ablation of ``r̂`` at every layer (removes refusal on harmful prompts).
* ``subtraction``: activation addition of ``-r`` at the chosen layer (the paper's "actadd" on harmful).
* ``addition``: activation addition of ``+r`` at the chosen layer (induces refusal on harmless).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from pipeline.hooks import activation_addition, directional_ablation
from pipeline.models.loading import LoadedModel

KINDS = ("baseline", "ablation", "subtraction", "addition")


@contextlib.contextmanager
def intervention(lm: LoadedModel, kind: str, direction: torch.Tensor, layer: int) -> Iterator[None]:
    if kind == "baseline":
        yield
    elif kind == "ablation":
        with directional_ablation(lm.model, lm.adapter, direction):
            yield
    elif kind in ("subtraction", "addition"):
        coeff = -1.0 if kind == "subtraction" else 1.0
        with activation_addition(lm.model, lm.adapter, direction, layer, coeff):
            yield
    else:
        raise ValueError(f"unknown intervention {kind!r}; expected one of {KINDS}")
