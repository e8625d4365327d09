"""How strongly each prompt's residual stream points along a direction, layer by layer.

The paper's picture of refusal: harmful prompts carry a large component along the refusal direction
at the post-instruction tokens, harmless ones do not. ``cosine_by_layer`` measures it per prompt, at
every layer (block inputs and the final-norm input, the same ``n_layers + 1`` sites the candidate
directions come from) and at each of the last ``n_positions`` tokens, so any prompt type (harmful,
harmless, jailbreak suffixes...) can be compared on one curve. ``layer_similarity`` compares the
candidate directions of different layers with each other.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from pipeline.hooks import residual_recorder, unit
from pipeline.inference import Runner
from pipeline.models.loading import LoadedModel


def _match_rows(rows: torch.Tensor, prompts: Sequence[Sequence[int]], pad_id: int,
                unmatched: dict[tuple[int, ...], deque[int]]) -> list[int]:
    """Prompt index of each left-padded row of ``rows``, identified by its token ids."""
    lengths = sorted({len(p) for p in prompts}, reverse=True)
    indices = []
    for row in rows.tolist():
        for length in lengths:
            pad, key = row[: len(row) - length], tuple(row[len(row) - length:])
            if length <= len(row) and unmatched.get(key) and all(t == pad_id for t in pad):
                indices.append(unmatched[key].popleft())
                break
        else:
            raise RuntimeError("a forward pass saw a sequence that is none of the prompts "
                               "(prefix cache active?)")
    return indices


@contextlib.contextmanager
def tracked_rows(lm: LoadedModel, prompts: Sequence[Sequence[int]], pad_id: int,
                 on_pass: Callable[[], None] = lambda: None) -> Iterator[Callable[[], list[int]]]:
    """While active, the yielded function gives the prompt index of each row of the current forward pass.

    Every prompt must be run once, in full (no prefix cache), in any order and batching; ``on_pass`` is
    called as each forward pass starts (also when an out-of-memory retry repeats one).
    """
    unmatched: dict[tuple[int, ...], deque[int]] = defaultdict(deque)
    for i, p in enumerate(prompts):
        unmatched[tuple(p)].append(i)
    current: dict[str, torch.Tensor] = {}

    def see_ids(module, args, kwargs):
        current["ids"] = (args[0] if args else kwargs["input"]).detach().cpu()
        on_pass()

    handle = lm.adapter.embedding(lm.model).register_forward_pre_hook(see_ids, with_kwargs=True)
    try:
        yield lambda: _match_rows(current["ids"], prompts, pad_id, unmatched)
    finally:
        handle.remove()


def full_pass_runner(lm: LoadedModel, batch_size: int) -> Runner:
    """A runner whose forward passes each see whole prompts (what hooks reading every position need)."""
    runner = lm.runner(batch_size)
    runner.use_prefix_cache = False
    return runner


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
    Rows are matched back to prompts by their token ids, so the result does not depend on how the
    runner orders or batches them.
    """
    n_pos = n_positions or lm.chat.n_post_instruction
    if any(len(p) < n_pos for p in prompts):
        raise ValueError(f"every prompt needs at least {n_pos} tokens")
    u = unit(direction)
    n_sites = lm.n_layers + 1
    projection = torch.zeros(len(prompts), n_pos, n_sites)
    norm = torch.zeros(len(prompts), n_pos, n_sites)
    seen = torch.zeros(len(prompts), dtype=torch.bool)
    runner = full_pass_runner(lm, batch_size)
    per_site: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(layer: int, resid: torch.Tensor) -> None:
        h = resid[:, -n_pos:, :].float()
        per_site.append(((h @ u.to(h.device)).cpu(), h.norm(dim=-1).cpu()))
        if layer == n_sites - 1:
            rows = current_rows()
            projection[rows] = torch.stack([p for p, _ in per_site], dim=-1)
            norm[rows] = torch.stack([n for _, n in per_site], dim=-1)
            seen[rows] = True

    with tracked_rows(lm, prompts, runner.pad_id, per_site.clear) as current_rows, \
            residual_recorder(lm.model, lm.adapter, record):
        runner.last_logits(prompts, desc=desc)
    if not seen.all():
        raise RuntimeError("some prompts were never seen by the residual recorder")
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
