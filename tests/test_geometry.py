"""Per-prompt cosine with a direction, layer by layer, equals what transformers' own hidden states give."""

import pytest
import torch

from conftest import PROMPTS
from pipeline.analysis.geometry import cosine_by_layer
from pipeline.hooks import residual_recorder


def _reference(lm, ids: list[int], direction: torch.Tensor, n_pos: int) -> torch.Tensor:
    """One prompt alone, no padding: hidden_states for block inputs, the recorder for the final-norm input."""
    seen = {}
    with torch.no_grad(), residual_recorder(lm.model, lm.adapter, seen.__setitem__):
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    states = [out.hidden_states[layer][0, -n_pos:] for layer in range(lm.n_layers)]
    states.append(seen[lm.n_layers][0, -n_pos:])
    stacked = torch.stack(states, dim=-1)  # [pos, d, sites]
    return torch.nn.functional.cosine_similarity(stacked, direction[None, :, None], dim=1)


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_cosine_by_layer_matches_unbatched_hidden_states(tiny_lm, family):
    lm = tiny_lm(family)
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(3))
    texts = PROMPTS + [PROMPTS[0]]  # lengths differ (padding, several batches) and one prompt repeats
    ids = lm.encode(texts)
    got = cosine_by_layer(lm, ids, 4 * direction, batch_size=2)  # the direction's norm must not matter
    n_pos = lm.chat.n_post_instruction
    assert got.shape == (len(texts), n_pos, lm.n_layers + 1)
    want = torch.stack([_reference(lm, i, direction, n_pos) for i in ids])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got[:, :, 1:].abs().max() > 0.05, "a random direction should show some cosine (test is meaningful)"


def test_cosine_by_layer_takes_any_number_of_trailing_positions(tiny_lm):
    lm = tiny_lm("qwen2")
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(4))
    ids = lm.encode(PROMPTS[:3])
    one = cosine_by_layer(lm, ids, direction, batch_size=8, n_positions=1)
    all_post = cosine_by_layer(lm, ids, direction, batch_size=8)
    torch.testing.assert_close(one[:, 0], all_post[:, -1])
    with pytest.raises(ValueError, match="at least"):
        cosine_by_layer(lm, [[1, 2]], direction, batch_size=2, n_positions=3)
