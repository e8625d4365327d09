"""Per-prompt cosine with a direction, layer by layer, equals what transformers' own hidden states give."""

import pytest
import torch

from conftest import PROMPTS
from pipeline.analysis.geometry import cosine_by_layer, direction_readout, layer_similarity
from pipeline.hooks import residual_recorder


def _states(lm, ids: list[int], n_pos: int) -> torch.Tensor:
    """One prompt alone, no padding: hidden_states for block inputs, the recorder for the final-norm input."""
    seen = {}
    with torch.no_grad(), residual_recorder(lm.model, lm.adapter, seen.__setitem__):
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    states = [out.hidden_states[layer][0, -n_pos:] for layer in range(lm.n_layers)]
    states.append(seen[lm.n_layers][0, -n_pos:])
    return torch.stack(states, dim=-1)  # [pos, d, sites]


def _reference(lm, ids: list[int], direction: torch.Tensor, n_pos: int) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(_states(lm, ids, n_pos), direction[None, :, None], dim=1)


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


def test_projection_is_the_component_along_the_unit_direction(tiny_lm):
    lm = tiny_lm("qwen2")
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(6))
    ids = lm.encode(PROMPTS[:3], [301, 302])  # with a suffix: positions are still the post-instruction tokens
    readout = direction_readout(lm, ids, 3 * direction, batch_size=2)
    n_pos = lm.chat.n_post_instruction
    want = torch.stack([torch.einsum("pds,d->ps", _states(lm, i, n_pos), direction / direction.norm()) for i in ids])
    torch.testing.assert_close(readout.projection, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(readout.cosine, cosine_by_layer(lm, ids, direction, batch_size=3))


def test_layer_similarity_is_pairwise_cosine_with_nan_for_zero_candidates():
    candidates = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(7))
    candidates[:, 0] = 0  # layer 0: every prompt has the same post-instruction embeddings
    sim = layer_similarity(candidates)
    assert sim.shape == (2, 5, 5)
    assert sim[:, 0].isnan().all() and sim[:, :, 0].isnan().all()
    for p, a, b in [(0, 1, 3), (1, 4, 2), (1, 3, 3)]:
        want = torch.nn.functional.cosine_similarity(candidates[p, a], candidates[p, b], dim=0)
        torch.testing.assert_close(sim[p, a, b], want)
