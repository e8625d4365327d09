"""Ablation folded into the weights: every matrix that writes into the residual stream loses the direction.

The writers are the token embedding (its rows are residual-stream vectors) and each block's attention
output and MLP down projections (``nn.Linear`` weights ``[d_model, d_in]``: their columns are residual-stream
vectors), with their biases. Removing a share ``w`` of a unit basis ``B`` from each of them,
``W' = W - w·BᵀB·W``, gives exactly the model that ``pipeline.hooks.weighted_ablation`` gives with hooks
(and, with ``w`` = 1 everywhere, the paper's directional ablation).

The norm-preserving variant then rescales every edited residual-stream vector (embedding row, weight
column, bias) back to its original norm, so the edit takes the direction away without shrinking what
each unit writes. Its hook form (``pipeline.hooks.weighted_ablation`` with ``norm_preserving``) scales each
output projection's input features instead; ``edited_in_place`` restores folded weights afterwards.

With tied embeddings the unembedding is untied first: hook ablation never touches it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.hooks import orthonormal, unit
from pipeline.models.adapters import ModelAdapter


def untie_output_embedding(model: nn.Module) -> bool:
    """Give the unembedding its own copy of tied weights; True if they were tied."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return False
    out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
    _set_tied(model, False)
    return True


def _set_tied(model: nn.Module, tied: bool) -> None:
    model.config.tie_word_embeddings = tied
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = tied


def _remove(vectors: torch.Tensor, basis: torch.Tensor, weight: float, dim: int, norm_preserving: bool) -> torch.Tensor:
    """``vectors`` (residual-stream vectors along ``dim``) with a share ``weight`` of ``basis`` removed, in float32."""
    v = vectors.float()
    b = basis.to(v.device)
    if dim == 0:  # columns of [d_model, d_in]
        edited = v - weight * b.T @ (b @ v)
    else:  # rows of [n, d_model]
        edited = v - weight * (v @ b.T) @ b
    if norm_preserving:
        edited = edited * (v.norm(dim=dim, keepdim=True) / edited.norm(dim=dim, keepdim=True).clamp_min(1e-12))
    return edited


@torch.no_grad()
def fold_ablation(model: nn.Module, adapter: ModelAdapter, directions: torch.Tensor,
                  attention_weights: torch.Tensor, mlp_weights: torch.Tensor, embedding_weight: float = 1.0,
                  per_layer: bool = False, norm_preserving: bool = False) -> bool:
    """Remove the directions from every residual-stream writer, in place (arguments as in
    ``pipeline.hooks.weighted_ablation``). Returns whether the embeddings had to be untied."""
    blocker = adapter.orthogonalization_blocker()
    if blocker:
        raise PipelineError(f"weight orthogonalization is not exact for this family: {blocker}",
                            "evaluate hook interventions instead, and set orthogonalize.save_model=false")
    blocks = adapter.blocks(model)
    if per_layer:
        bases = [unit(d)[None] for d in directions]
    else:
        bases = [orthonormal(directions).reshape(-1, directions.shape[-1])] * len(blocks)
    untied = untie_output_embedding(model)
    embedding = adapter.embedding(model).weight
    if embedding_weight:
        embedding.copy_(_remove(embedding, bases[0], embedding_weight, 1, norm_preserving))
    weights = zip(attention_weights.tolist(), mlp_weights.tolist(), strict=True)
    for block, basis, (w_attn, w_mlp) in zip(blocks, bases, weights, strict=True):
        for linear, weight in zip(adapter.output_projections(block), (w_attn, w_mlp), strict=True):
            if not weight:
                continue
            linear.weight.copy_(_remove(linear.weight, basis, weight, 0, norm_preserving))
            if linear.bias is not None:
                linear.bias.copy_(_remove(linear.bias[None], basis, weight, 1, norm_preserving)[0])
    return untied


@contextlib.contextmanager
def edited_in_place(model: nn.Module, adapter: ModelAdapter) -> Iterator[None]:
    """Weight edits made inside the block are undone on exit (embedding, unembedding and the output
    projections are saved first; tied embeddings are re-tied). Costs one copy of those matrices."""
    out = model.get_output_embeddings()
    output_param = out.weight if out is not None else None
    tied = bool(model.config.get_text_config().tie_word_embeddings)
    modules = [adapter.embedding(model)] + [p for b in adapter.blocks(model) for p in adapter.output_projections(b)]
    saved = [{name: p.detach().clone() for name, p in m.named_parameters(recurse=False)} for m in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, params in zip(modules, saved):
                for name, value in params.items():
                    getattr(module, name).copy_(value)
            if out is not None and out.weight is not output_param:
                out.weight = output_param
            _set_tied(model, tied)
