"""How strongly each prompt's residual stream points along a direction, layer by layer.

The paper's picture of refusal: harmful prompts carry a large component along the refusal direction
at the post-instruction tokens, harmless ones do not. ``cosine_by_layer`` measures it per prompt, at
every layer (block inputs and the final-norm input, the same ``n_layers + 1`` sites the candidate
directions come from) and at each of the last ``n_positions`` tokens, so any prompt type (harmful,
harmless, jailbreak suffixes...) can be compared on one curve.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence

import torch

from pipeline.hooks import residual_recorder, unit
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


def cosine_by_layer(
    lm: LoadedModel,
    prompts: Sequence[Sequence[int]],
    direction: torch.Tensor,
    batch_size: int,
    n_positions: int | None = None,
    desc: str = "cosine",
) -> torch.Tensor:
    """Cosine similarity ``[n_prompts, n_positions, n_layers + 1]`` of the residual stream with ``direction``.

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
    out = torch.zeros(len(prompts), n_pos, n_sites)
    seen = torch.zeros(len(prompts), dtype=torch.bool)
    unmatched: dict[tuple[int, ...], deque[int]] = defaultdict(deque)
    for i, p in enumerate(prompts):
        unmatched[tuple(p)].append(i)
    runner = lm.runner(batch_size)
    runner.use_prefix_cache = False  # the recorder must see each prompt's own, complete forward pass
    current: dict[str, torch.Tensor] = {}
    per_site: list[torch.Tensor] = []

    def see_ids(module, args, kwargs):
        current["ids"] = (args[0] if args else kwargs["input"]).detach().cpu()
        per_site.clear()  # a new forward pass (also after an out-of-memory retry)

    def record(layer: int, resid: torch.Tensor) -> None:
        h = resid[:, -n_pos:, :].float()
        per_site.append(((h @ u.to(h.device)) / h.norm(dim=-1).clamp_min(1e-12)).cpu())
        if layer == n_sites - 1:
            rows = _match_rows(current["ids"], prompts, runner.pad_id, unmatched)
            out[rows] = torch.stack(per_site, dim=-1)
            seen[rows] = True

    embedding = lm.adapter.embedding(lm.model)
    handle = embedding.register_forward_pre_hook(see_ids, with_kwargs=True)
    try:
        with residual_recorder(lm.model, lm.adapter, record):
            runner.last_logits(prompts, desc=desc)
    finally:
        handle.remove()
    if not seen.all():
        raise RuntimeError("some prompts were never seen by the residual recorder")
    return out
