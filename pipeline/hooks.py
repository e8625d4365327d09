"""The paper's two interventions, as context managers that register PyTorch hooks.

* Directional ablation removes the component along ``r̂`` from the residual stream everywhere: at the
  input of every block and from the output of every module that writes into the stream, so no
  position at any layer carries it.
* Activation addition adds ``coeff · r`` to the residual stream at the input of one block (or of the
  final norm, for the "after the last layer" index), at every position.

Hooks are registered with ``prepend=True`` so they run before transformers' own output recorders
(``output_hidden_states`` then sees the edited stream). A direction may be ``[d_model]`` or
``[k, d_model]``: then the batch is read as ``k`` equal, consecutive blocks of rows and block ``i``
gets direction ``i`` (how several candidates are scored in one pass, see
``Runner.last_logits_stacked``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pipeline.models.adapters import ModelAdapter


def per_row(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a ``[d]`` or ``[k, d]`` vector over ``x`` ``[batch, seq, d]`` (``k`` blocks of rows)."""
    v = v.to(device=x.device, dtype=torch.float32)
    if v.dim() == 1:
        return v
    if x.shape[0] % v.shape[0]:
        raise ValueError(f"batch of {x.shape[0]} rows is not {v.shape[0]} equal blocks")
    return v.repeat_interleave(x.shape[0] // v.shape[0], dim=0)[:, None, :]


def project_out(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``x - (x·û)û`` over the last dimension, computed in float32 and cast back."""
    x32 = x.float()
    u = per_row(unit, x)
    return (x32 - (x32 * u).sum(-1, keepdim=True) * u).to(x.dtype)


def _map_first(value, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Apply ``fn`` to a hidden-state tensor, or to the first element of a module's tuple output."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    return (fn(value[0]), *value[1:])


@contextlib.contextmanager
def _registered(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def unit(direction: torch.Tensor) -> torch.Tensor:
    direction = direction.float()
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@contextlib.contextmanager
def directional_ablation(model: nn.Module, adapter: ModelAdapter, direction: torch.Tensor) -> Iterator[None]:
    """Project ``direction`` out of the residual stream at every layer and position."""
    u = unit(direction)

    def pre_hook(module, args, kwargs):
        if args:
            return (project_out(args[0], u), *args[1:]), kwargs
        kwargs["hidden_states"] = project_out(kwargs["hidden_states"], u)
        return args, kwargs

    def out_hook(module, args, output):
        return _map_first(output, lambda t: project_out(t, u))

    handles = []
    for block in adapter.blocks(model):
        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
        for writer in adapter.residual_writers(block):
            handles.append(writer.register_forward_hook(out_hook, prepend=True))
    with _registered(handles):
        yield


def addition_site(model: nn.Module, adapter: ModelAdapter, layer: int) -> nn.Module:
    """The module whose input is the residual stream at ``layer`` (``n_layers`` = after the last block)."""
    blocks = adapter.blocks(model)
    if not 0 <= layer <= len(blocks):
        raise IndexError(f"layer {layer} out of range 0..{len(blocks)}")
    return blocks[layer] if layer < len(blocks) else adapter.final_norm(model)


@contextlib.contextmanager
def activation_addition(
    model: nn.Module, adapter: ModelAdapter, vector: torch.Tensor, layer: int, coeff: float = 1.0
) -> Iterator[None]:
    """Add ``coeff * vector`` to the residual stream entering ``layer``, at every position."""
    delta = coeff * vector.float()

    def add(t: torch.Tensor) -> torch.Tensor:
        return (t.float() + per_row(delta, t)).to(t.dtype)

    def pre_hook(module, args, kwargs):
        if args:
            return (add(args[0]), *args[1:]), kwargs
        kwargs["hidden_states"] = add(kwargs["hidden_states"])
        return args, kwargs

    site = addition_site(model, adapter, layer)
    with _registered([site.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)]):
        yield


@contextlib.contextmanager
def residual_recorder(
    model: nn.Module, adapter: ModelAdapter, record: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``record(layer, resid)`` with the residual stream entering each block and the final norm."""
    sites = [*adapter.blocks(model), adapter.final_norm(model)]
    handles = []
    for layer, site in enumerate(sites):

        def hook(module, args, kwargs, layer=layer):
            record(layer, args[0] if args else kwargs["hidden_states"])

        handles.append(site.register_forward_pre_hook(hook, with_kwargs=True))
    with _registered(handles):
        yield
