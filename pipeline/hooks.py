"""The paper's two interventions, as context managers that register PyTorch hooks.

* Directional ablation removes the component along ``r̂`` from the residual stream everywhere: at the
  input of every block and from the output of every module that writes into the stream, so no
  position at any layer carries it.
  Several directions ``[k, d_model]`` are a basis: the whole subspace they span is removed.
* Weighted ablation removes only a share of the direction from each write: block ``l``'s attention
  output loses ``attention_weights[l]`` of it, its MLP output ``mlp_weights[l]``, the token embedding
  ``embedding_weight`` (all 1: the paper's ablation, up to rounding). It touches exactly what a weight
  edit can, so folding it into the weights gives the same model. Its norm-preserving form also scales each
  output projection's inputs so that every written vector keeps its norm, as the folded edit does.
* Activation addition adds ``coeff · r`` to the residual stream at the input of one block (or of the
  final norm, for the "after the last layer" index), at every position.

Hooks are registered with ``prepend=True`` so they run before transformers' own output recorders
(``output_hidden_states`` then sees the edited stream). With ``stacked=True`` a ``[k, d_model]``
argument is not a basis but ``k`` alternatives: the batch is read as ``k`` equal, consecutive blocks
of rows and block ``i`` gets direction ``i`` (how several candidates are scored in one pass, see
``Runner.last_logits_stacked``).

Several interventions can also share one batch, each acting on its own rows (``RowGroups``): hooks
registered inside ``acting_on(groups, g)`` touch only the rows the runner currently assigns to group
``g``, so the conditions of an evaluation stage decode together (``generation.complete_conditions``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import nn

from pipeline.errors import ForwardStopped
from pipeline.models.adapters import ModelAdapter


class RowGroups:
    """Which group each row of the running batch belongs to; ``Runner.generate`` updates it as rows
    join (a new batch) and leave (a finished completion)."""

    def __init__(self) -> None:
        self.rows: dict[int, torch.Tensor] = {}

    def track(self, group: torch.Tensor) -> None:
        """Rows ``i`` of the next passes belong to group ``group[i]`` (on the model's device)."""
        self.rows = {int(g): (group == g).nonzero().squeeze(1) for g in group.unique()}

    def of(self, g: int) -> torch.Tensor | None:
        return self.rows.get(g)


_ACTING_ON: ContextVar[tuple[RowGroups, int] | None] = ContextVar("acting_on", default=None)


@contextlib.contextmanager
def acting_on(groups: RowGroups, g: int) -> Iterator[None]:
    """Hooks registered inside this block edit only group ``g``'s rows (see ``RowGroups``)."""
    token = _ACTING_ON.set((groups, g))
    try:
        yield
    finally:
        _ACTING_ON.reset(token)


@contextlib.contextmanager
def acting_together(interventions: Sequence[Callable[[], contextlib.AbstractContextManager]]) -> Iterator[RowGroups]:
    """Enter every intervention (a function returning its context manager), intervention ``g`` acting only on
    the rows of group ``g``; yields the ``RowGroups`` whose ``track`` the runner must be given (``Groups``)."""
    rows = RowGroups()
    with contextlib.ExitStack() as stack:
        for g, intervention in enumerate(interventions):
            with acting_on(rows, g):
                stack.enter_context(intervention())
        yield rows


def _scoped(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` restricted to the rows of the group in force where the hook is registered (all rows outside
    ``acting_on``)."""
    scope = _ACTING_ON.get()
    if scope is None:
        return fn
    groups, g = scope

    def on_rows(t: torch.Tensor) -> torch.Tensor:
        rows = groups.of(g)
        if rows is None:
            return t
        if len(rows) == t.shape[0]:
            return fn(t)
        return t.index_copy(0, rows, fn(t.index_select(0, rows)))

    return on_rows


def acting_on_rows() -> bool:
    """Whether hooks registered now would edit only some rows (a weight edit cannot)."""
    return _ACTING_ON.get() is not None


def per_row(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a ``[d]`` or ``[k, d]`` vector over ``x`` ``[batch, seq, d]`` (``k`` blocks of rows)."""
    v = v.to(device=x.device, dtype=torch.float32)
    if v.dim() == 1:
        return v
    if x.shape[0] % v.shape[0]:
        raise ValueError(f"batch of {x.shape[0]} rows is not {v.shape[0]} equal blocks")
    return v.repeat_interleave(x.shape[0] // v.shape[0], dim=0)[:, None, :]


def project_out(x: torch.Tensor, basis: torch.Tensor, stacked: bool = False, weight: float = 1.0) -> torch.Tensor:
    """``x - w·(x·û)û`` over the last dimension, in float32 and cast back.

    ``basis`` is ``[d]`` or orthonormal rows ``[k, d]`` (the subspace is removed); with ``stacked`` its
    rows are alternatives, one per block of rows of ``x``.
    """
    x32 = x.float()
    if stacked or basis.dim() == 1:
        u = per_row(basis, x)
        return (x32 - weight * (x32 * u).sum(-1, keepdim=True) * u).to(x.dtype)
    b = basis.to(device=x.device, dtype=torch.float32)
    return (x32 - weight * (x32 @ b.T) @ b).to(x.dtype)


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


def orthonormal(directions: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (rows) of the span of ``directions`` (``[d]`` or ``[k, d]``); one direction
    is just normalised, so the paper's single-direction numbers are computed exactly as before."""
    if directions.dim() == 1 or directions.shape[0] == 1:
        return unit(directions.reshape(-1))
    q, r = torch.linalg.qr(directions.float().T)
    return q.T[r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()]


@contextlib.contextmanager
def directional_ablation(model: nn.Module, adapter: ModelAdapter, directions: torch.Tensor,
                         stacked: bool = False) -> Iterator[None]:
    """Project ``directions`` (one, a basis, or with ``stacked`` one per block of rows) out of the residual
    stream at every layer and position."""
    u = unit(directions) if stacked else orthonormal(directions)
    ablate = _scoped(lambda t: project_out(t, u, stacked))

    def pre_hook(module, args, kwargs):
        if args:
            return (ablate(args[0]), *args[1:]), kwargs
        kwargs["hidden_states"] = ablate(kwargs["hidden_states"])
        return args, kwargs

    def out_hook(module, args, output):
        return _map_first(output, ablate)

    handles = []
    for block in adapter.blocks(model):
        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
        for writer in adapter.residual_writers(block):
            handles.append(writer.register_forward_hook(out_hook, prepend=True))
    with _registered(handles):
        yield


def norm_restoring_scales(vectors: torch.Tensor, basis: torch.Tensor, share: float) -> torch.Tensor:
    """By how much each of ``vectors`` (along the last dimension, e.g. a residual writer's columns as
    ``weight.T``) must grow to keep its norm once a ``share`` of ``basis`` is removed from it (float32)."""
    v = vectors.float()
    return v.norm(dim=-1) / project_out(v, basis, weight=share).norm(dim=-1).clamp_min(1e-12)


@contextlib.contextmanager
def weighted_ablation(model: nn.Module, adapter: ModelAdapter, directions: torch.Tensor,
                      attention_weights: torch.Tensor, mlp_weights: torch.Tensor, embedding_weight: float = 1.0,
                      per_layer: bool = False, norm_preserving: bool = False) -> Iterator[None]:
    """Remove a per-layer share of ``directions`` from every write into the residual stream.

    ``directions`` is a basis ``[k, d]`` shared by all layers, or with ``per_layer`` one direction per
    block (the embedding uses block 0's). Block ``l``'s residual writers are its attention and its MLP,
    in the adapter's order.

    With ``norm_preserving`` every written vector keeps its norm, as ``pipeline.weight_edits`` folds it: each
    embedding output is scaled back to its norm, and each output projection's input features are scaled
    (``norm_restoring_scales``) so that the columns they weigh keep theirs (a bias, rescaled the same way,
    replaces the projected one). Only for families whose output projections are their residual writers.
    """
    bases = [unit(d) for d in directions] if per_layer else [orthonormal(directions)] * len(adapter.blocks(model))

    def out_hook(fn: Callable[[torch.Tensor], torch.Tensor]):
        scoped = _scoped(fn)

        def hook(module, args, output):
            return _map_first(output, scoped)
        return hook

    def removed(basis: torch.Tensor, weight: float, shift: torch.Tensor | None = None):
        if shift is None:
            return lambda t: project_out(t, basis, weight=weight)
        return lambda t: (project_out(t, basis, weight=weight).float() + shift.to(t.device)).to(t.dtype)

    def kept_norm(basis: torch.Tensor, weight: float):
        def fn(t: torch.Tensor) -> torch.Tensor:
            edited = project_out(t, basis, weight=weight).float()
            return (edited * (t.float().norm(dim=-1, keepdim=True) / edited.norm(dim=-1, keepdim=True).clamp_min(1e-12))
                    ).to(t.dtype)
        return fn

    def scaled_input(scales: torch.Tensor):
        scale = _scoped(lambda t: (t.float() * scales.to(t.device)).to(t.dtype))

        def pre_hook(module, args):
            return (scale(args[0]), *args[1:])
        return pre_hook

    handles = []
    if embedding_weight:
        fn = (kept_norm if norm_preserving else removed)(bases[0], embedding_weight)
        handles.append(adapter.embedding(model).register_forward_hook(out_hook(fn), prepend=True))
    for block, basis, w_attn, w_mlp in zip(adapter.blocks(model), bases, attention_weights.tolist(),
                                           mlp_weights.tolist(), strict=True):
        writers = zip(adapter.residual_writers(block), adapter.output_projections(block), (w_attn, w_mlp), strict=True)
        for writer, linear, weight in writers:
            if not weight:
                continue
            shift = None
            if norm_preserving:
                handles.append(linear.register_forward_pre_hook(
                    scaled_input(norm_restoring_scales(linear.weight.T, basis, weight)), prepend=True))
                if linear.bias is not None:
                    bias = linear.bias.float()[None]
                    kept = kept_norm(basis, weight)(bias)
                    shift = (kept - project_out(bias, basis, weight=weight))[0]
            handles.append(writer.register_forward_hook(out_hook(removed(basis, weight, shift)), prepend=True))
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
    model: nn.Module, adapter: ModelAdapter, vector: torch.Tensor, layer: int, coeff: float = 1.0,
    stacked: bool = False,
) -> Iterator[None]:
    """Add ``coeff * vector`` to the residual stream entering ``layer``, at every position (with
    ``stacked``, ``vector`` is ``[k, d]``: one vector per block of rows)."""
    if vector.dim() != (2 if stacked else 1):
        raise ValueError(f"activation addition of a {tuple(vector.shape)} vector with stacked={stacked}")
    delta = coeff * vector.float()

    @_scoped
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
    model: nn.Module, adapter: ModelAdapter, record: Callable[[int, torch.Tensor], None], until: int | None = None
) -> Iterator[None]:
    """Call ``record(layer, resid)`` with the residual stream entering each block and the final norm.

    With ``until``, each pass stops (``ForwardStopped``) right after site ``until`` is recorded, so the
    layers past it cost nothing; only ``Runner.read_passes`` expects that.
    """
    sites = [*adapter.blocks(model), adapter.final_norm(model)]
    handles = []
    for layer, site in enumerate(sites):

        def hook(module, args, kwargs, layer=layer):
            record(layer, args[0] if args else kwargs["hidden_states"])
            if layer == until:
                raise ForwardStopped(layer)

        handles.append(site.register_forward_pre_hook(hook, with_kwargs=True))
    with _registered(handles):
        yield
