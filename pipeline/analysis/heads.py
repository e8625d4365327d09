"""Attention heads that write along a direction, and where they look from the last prompt token.

The attention output is ``o_proj(concat_h z_h) = sum_h W_O[:, h] z_h (+ bias)``, where ``W_O[:, h]`` is
the block of ``head_dim`` columns of head ``h``; so head ``h``'s direct contribution along the unit
direction ``r̂`` is ``(W_O[:, h]ᵀ r̂) · z_h``, read from a pre-hook on ``o_proj``. (For Gemma 2/3, whose
attention output is normalised again before entering the residual stream, this is the contribution
before that norm.) The attention probabilities come from the attention modules themselves, which
return them with transformers' ``eager`` implementation (``eager_attention``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from pipeline.hooks import unit
from pipeline.models.loading import LoadedModel

# Token regions of a prompt: chat template before the instruction, the instruction, an appended suffix,
# and the post-instruction template tokens.
REGIONS = ("chat_prefix", "instruction", "suffix", "post_instruction")


@contextlib.contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run attention with transformers' eager implementation, which returns the probabilities."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@dataclass
class HeadReadout:
    contribution: torch.Tensor   # [n_prompts, n_layers, n_heads]: each head's output along r̂, last position
    attention: list[torch.Tensor]  # per prompt [n_layers, n_heads, len(prompt)]: the last position's attention


def head_readout(lm: LoadedModel, prompts: Sequence[Sequence[int]], direction: torch.Tensor, batch_size: int,
                 desc: str = "heads") -> HeadReadout:
    """Every head's direct contribution along ``direction`` and attention pattern at each prompt's last token.

    Needs ``eager_attention`` (other implementations return no probabilities).
    """
    u = unit(direction)
    blocks = lm.adapter.blocks(lm.model)
    n_heads = lm.model.config.get_text_config().num_attention_heads
    readers = []
    for block in blocks:
        weight = lm.adapter.attention_output(block).weight  # [d_model, n_heads * head_dim]
        readers.append((weight.float().T @ u.to(weight.device)).view(n_heads, -1))
    batch: dict[str, dict[int, torch.Tensor]] = {"z": {}, "attn": {}}  # layer -> what this pass showed

    def read_heads(layer: int, heads_out: torch.Tensor) -> None:
        z = heads_out[:, -1].float()
        batch["z"][layer] = (z.view(len(z), n_heads, -1) * readers[layer].to(z.device)).sum(-1).cpu()

    def read_attention(layer: int, probabilities: torch.Tensor | None) -> None:
        if probabilities is None:
            raise RuntimeError("the attention module returned no probabilities: run inside eager_attention()")
        batch["attn"][layer] = probabilities[:, :, -1].float().cpu()  # [rows, heads, keys]

    def read(indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        layers = range(len(blocks))
        return [(torch.stack([batch["z"][l][row] for l in layers]),
                 torch.stack([batch["attn"][l][row, :, -len(prompts[index]):] for l in layers]))
                for row, index in enumerate(indices)]

    handles = []
    for layer, block in enumerate(blocks):
        handles.append(lm.adapter.attention_output(block).register_forward_pre_hook(
            lambda m, a, layer=layer: read_heads(layer, a[0])))
        handles.append(lm.adapter.attention(block).register_forward_hook(
            lambda m, a, o, layer=layer: read_attention(layer, o[1])))
    try:
        rows = lm.runner(batch_size).read_passes(prompts, read, desc=desc)
    finally:
        for handle in handles:
            handle.remove()
    contribution = torch.stack([c for c, _ in rows]) if rows else torch.zeros(0, len(blocks), n_heads)
    attention = [a for _, a in rows]
    return HeadReadout(contribution, attention)


def region_shares(attention: torch.Tensor, n_prefix: int, n_suffix: int, n_post: int) -> torch.Tensor:
    """Attention ``[..., len(prompt)]`` summed over each of ``REGIONS`` -> ``[..., len(REGIONS)]``.

    The prompt is ``n_prefix`` chat-template tokens, the instruction, ``n_suffix`` suffix tokens and
    ``n_post`` post-instruction tokens.
    """
    length = attention.shape[-1]
    bounds = [0, n_prefix, length - n_post - n_suffix, length - n_post, length]
    if not bounds == sorted(bounds):
        raise ValueError(f"a prompt of {length} tokens cannot hold {n_prefix} + {n_suffix} + {n_post} "
                         "template and suffix tokens")
    return torch.stack([attention[..., a:b].sum(-1) for a, b in zip(bounds, bounds[1:])], dim=-1)
