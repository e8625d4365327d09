"""How strongly each prompt's residual stream points along a direction, layer by layer.

The paper's picture of refusal: harmful prompts carry a large component along the refusal direction
at the post-instruction tokens, harmless ones do not. ``cosine_by_layer`` measures it per prompt, at
every layer (block inputs and the final-norm input, the same ``n_layers + 1`` sites the candidate
directions come from) and at each of the last ``n_positions`` tokens, so any prompt type (harmful,
harmless, jailbreak suffixes...) can be compared on one curve. ``layer_similarity`` compares the
candidate directions of different layers with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.hooks import residual_recorder, unit
from pipeline.models.loading import LoadedModel


@dataclass
class Readout:
    """Residual stream along a direction, ``[n_prompts, n_positions, n_layers + 1]``."""

    cosine: torch.Tensor
    projection: torch.Tensor  # the component along the unit direction, in residual-stream units


def direction_readout(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    direction: torch.Tensor,
    batch_size: int,
    n_positions: int | None = None,
    desc: str = "cosine",
) -> Readout:
    """Cosine with ``direction`` and projection on its unit vector, per prompt, position and layer.

    ``prompts`` are full token ids (``lm.encode``); positions are the last ``n_positions`` tokens of
    each prompt (default: the post-instruction tokens, the last one being the last prompt token).
    """
    n_pos = n_positions or lm.chat.n_post_instruction
    if any(len(p) < n_pos for p in prompts):
        raise ValueError(f"every prompt needs at least {n_pos} tokens")
    u = unit(direction)
    n_sites = lm.n_layers + 1
    sites: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (projection, norm) of this pass

    def record(layer: int, resid: torch.Tensor) -> None:
        h = resid[:, -n_pos:, :].float()
        sites[layer] = ((h @ u.to(h.device)).cpu(), h.norm(dim=-1).cpu())

    def read(indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        projection, norm = (torch.stack([sites[l][k] for l in range(n_sites)], dim=-1) for k in (0, 1))
        return list(zip(projection, norm))

    with residual_recorder(lm.model, lm.adapter, record):
        rows = lm.runner(batch_size).read_passes(prompts, read, desc=desc)
    if not rows:
        return Readout(torch.zeros(0, n_pos, n_sites), torch.zeros(0, n_pos, n_sites))
    projection = torch.stack([p for p, _ in rows])
    norm = torch.stack([n for _, n in rows])
    return Readout(projection / norm.clamp_min(1e-12), projection)


def cosine_by_layer(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    direction: torch.Tensor,
    batch_size: int,
    n_positions: int | None = None,
    desc: str = "cosine",
) -> torch.Tensor:
    """Cosine similarity ``[n_prompts, n_positions, n_layers + 1]`` of the residual stream with ``direction``
    (see ``direction_readout``)."""
    return direction_readout(lm, prompts, direction, batch_size, n_positions, desc).cosine


def layer_similarity(candidates: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the candidate directions of every pair of layers, per position.

    ``candidates`` ``[positions, n_layers + 1, d_model]`` -> ``[positions, n_layers + 1, n_layers + 1]``;
    NaN where a candidate is zero (e.g. layer 0, where all prompts share the post-instruction embeddings).
    How quickly it falls off the diagonal shows how the direction evolves with depth.
    """
    c = candidates.double()
    norms = c.norm(dim=-1)
    sim = (c @ c.transpose(1, 2)) / (norms[:, :, None] * norms[:, None, :])
    zero = (norms == 0)[:, :, None] | (norms == 0)[:, None, :]
    return sim.masked_fill(zero, float("nan")).float()
