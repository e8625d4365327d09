"""The paper's claims about the interventions, checked exactly on tiny random models (float32)."""

import pytest
import torch

from conftest import FAMILIES, PROMPTS
from pipeline.hooks import activation_addition, directional_ablation, residual_recorder, unit
from pipeline.stages.activations import mean_activations
from pipeline.stages.directions import difference_in_means
from pipeline.stages.orthogonalize import orthogonalize_weights

POST_NORM = {"gemma2", "gemma3", "gemma3-mm"}  # sublayer outputs are normalised before the residual add


def _batch(lm, prompts=PROMPTS):
    ids = lm.encode(prompts)
    width = max(map(len, ids))
    input_ids = torch.tensor([[lm.tokenizer.pad_token_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    return input_ids, mask


def _residuals(lm, input_ids, mask) -> list[torch.Tensor]:
    """Residual stream entering each block and the final norm."""
    seen: dict[int, torch.Tensor] = {}
    with residual_recorder(lm.model, lm.adapter, lambda layer, x: seen.__setitem__(layer, x.detach().clone())):
        lm.model(input_ids=input_ids, attention_mask=mask)
    return [seen[i] for i in range(lm.n_layers + 1)]


def _direction(lm, seed=1):
    return torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ablation_leaves_no_component_along_r_at_any_layer(tiny_lm, family):
    lm = tiny_lm(family)
    r = _direction(lm)
    input_ids, mask = _batch(lm)
    writes: list[torch.Tensor] = []
    handles = [w.register_forward_hook(lambda m, a, out: writes.append(out[0] if isinstance(out, tuple) else out))
               for block in lm.adapter.blocks(lm.model) for w in lm.adapter.residual_writers(block)]
    with torch.no_grad(), directional_ablation(lm.model, lm.adapter, r):
        resid = _residuals(lm, input_ids, mask)
    for h in handles:
        h.remove()
    baseline = _residuals(lm, input_ids, mask)
    u = unit(r)
    for layer, (x, x0) in enumerate(zip(resid, baseline)):
        assert (x @ u).abs().max() < 1e-4 * x.norm(dim=-1).max(), f"layer {layer} keeps a component along r"
        if layer > 0:
            assert (x0 @ u).abs().max() > 1e-2, "baseline should carry the direction (test is meaningful)"
    assert len(writes) == 2 * lm.n_layers
    assert all((w @ u).abs().max() < 1e-4 * max(1.0, float(w.norm(dim=-1).max())) for w in writes)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layer", [0, 2, 4])
def test_activation_addition_adds_exactly_the_vector_at_its_layer(tiny_lm, family, layer):
    lm = tiny_lm(family)
    r = _direction(lm, seed=2)
    input_ids, mask = _batch(lm)
    with torch.no_grad():
        before = _residuals(lm, input_ids, mask)
        with activation_addition(lm.model, lm.adapter, r, layer, coeff=1.5):
            after = _residuals(lm, input_ids, mask)
    for l in range(lm.n_layers + 1):
        if l < layer:
            torch.testing.assert_close(after[l], before[l], rtol=0, atol=0)
        elif l == layer:
            torch.testing.assert_close(after[l] - before[l], (1.5 * r).expand_as(before[l]), rtol=1e-5, atol=1e-5)
        else:
            assert not torch.allclose(after[l], before[l]), f"layer {l} should change downstream of the addition"


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - POST_NORM))
@pytest.mark.parametrize("tie", [False, True])
def test_orthogonalized_weights_match_hook_ablation(tiny_lm, family, tie, tmp_path):
    if tie and family == "qwen":
        pytest.skip("Qwen-1 checkpoints never tie their embeddings (the stand-in cannot)")
    lm = tiny_lm(family, tie=tie)
    r = _direction(lm, seed=3)
    input_ids, mask = _batch(lm)
    with torch.no_grad():
        original = lm.model(input_ids=input_ids, attention_mask=mask).logits
        with directional_ablation(lm.model, lm.adapter, r):
            hooked = lm.model(input_ids=input_ids, attention_mask=mask).logits
        untied = orthogonalize_weights(lm.model, lm.adapter, r)
        edited = lm.model(input_ids=input_ids, attention_mask=mask).logits
    assert untied == tie
    assert not torch.allclose(original, hooked, atol=1e-3), "ablation should matter (test is meaningful)"
    torch.testing.assert_close(edited[mask.bool()], hooked[mask.bool()], rtol=1e-4, atol=1e-4)
    # the saved edited model reloads to the same function (tied weights stay untied)
    lm.model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        again = reloaded(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(again[mask.bool()], hooked[mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(POST_NORM))
def test_orthogonalization_refuses_post_norm_families(tiny_lm, family):
    from pipeline.errors import PipelineError

    lm = tiny_lm(family)
    with pytest.raises(PipelineError, match="Gemma 2/3"):
        orthogonalize_weights(lm.model, lm.adapter, _direction(lm))


@pytest.mark.parametrize("family", sorted(POST_NORM))
def test_post_norm_ablation_edits_the_normalised_outputs(tiny_lm, family):
    """The residual writers of Gemma 2/3 are the post-norms; ablating at the projections would not suffice."""
    lm = tiny_lm(family)
    block = lm.adapter.blocks(lm.model)[0]
    assert lm.adapter.residual_writers(block) == [block.post_attention_layernorm, block.post_feedforward_layernorm]


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_difference_in_means_of_recorded_activations(tiny_lm, family):
    lm = tiny_lm(family)
    harmful, harmless = PROMPTS[:3], PROMPTS[3:]
    n_pos = lm.chat.n_post_instruction

    def reference(prompts):
        # one prompt at a time, no padding, from transformers' own hidden states
        rows = []
        for ids in lm.encode(prompts):
            with torch.no_grad():
                out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            last = _residuals(lm, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[-1]
            states = [out.hidden_states[l][0, -n_pos:] for l in range(lm.n_layers)] + [last[0, -n_pos:]]
            rows.append(torch.stack(states, dim=1))  # [pos, layers + 1, d]
        return torch.stack(rows).double().mean(0)

    got = difference_in_means(mean_activations(lm, harmful, 2), mean_activations(lm, harmless, 2))
    want = reference(harmful) - reference(harmless)
    assert got.shape == (n_pos, lm.n_layers + 1, lm.d_model)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
