"""The paper's claims about the interventions, checked exactly on tiny random models (float32)."""

from dataclasses import replace

import pytest
import torch

from conftest import FAMILIES, PROMPTS
from pipeline.edit import Edit, Kernel
from pipeline.hooks import activation_addition, directional_ablation, residual_recorder, unit
from pipeline.interventions import INTERVENTIONS, apply, get_intervention, projected
from pipeline.stages.activations import mean_activations
from pipeline.stages.directions import difference_in_means
from pipeline.weight_edits import edited_in_place


def orthogonalize_weights(model, adapter, r) -> bool:
    """The paper's weight orthogonalization: the registered fold of ``ablation``."""
    edit = Edit.of(r, 1, len(adapter.blocks(model)))
    return get_intervention("ablation").fold(model, adapter, edit)

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


FOLDABLE = sorted(name for name, iv in INTERVENTIONS.items() if iv.fold is not None)


def _edit(lm, seed=4, **kwargs) -> Edit:
    g = torch.Generator().manual_seed(seed)
    return Edit.of(torch.randn(lm.d_model, generator=g), 2, lm.n_layers,
                   harmless_mean=torch.randn(lm.d_model, generator=g), **kwargs)


def _kernel_edit(lm) -> Edit:
    """A non-trivial weighted ablation: different attention and MLP kernels, half-strength embedding."""
    return _edit(lm, attention_weights=Kernel(1.0, 1, 0.3, 2).weights(lm.n_layers),
                 mlp_weights=Kernel(0.8, 2, 0.5, 1.5).weights(lm.n_layers), embedding_weight=0.5)


def _trial_edit(lm) -> Edit:
    """A search trial's edit record: a kernel, and the intervention it was measured with."""
    return replace(_kernel_edit(lm), provenance={"method": "search", "intervention": "weighted_ablation"})


def _logits(lm, input_ids, mask):
    with torch.no_grad():
        return lm.model(input_ids=input_ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - POST_NORM))
@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_every_foldable_intervention_folds_into_weights_that_equal_its_hooks(tiny_lm, family, name):
    lm = tiny_lm(family, tie=family != "qwen")
    edit = {"weighted_ablation": _kernel_edit(lm), "recorded": _trial_edit(lm)}.get(name) or _edit(lm)
    input_ids, mask = _batch(lm)
    original = _logits(lm, input_ids, mask)
    with apply(lm, name, edit):
        hooked = _logits(lm, input_ids, mask)
    INTERVENTIONS[name].fold(lm.model, lm.adapter, edit)
    folded = _logits(lm, input_ids, mask)
    assert not torch.allclose(original[mask.bool()], hooked[mask.bool()], atol=1e-3), "the edit should matter"
    torch.testing.assert_close(folded[mask.bool()], hooked[mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_weighted_ablation_at_full_strength_is_the_papers_ablation(tiny_lm, family):
    lm = tiny_lm(family)
    edit = _edit(lm)  # kernel weights 1 everywhere
    input_ids, mask = _batch(lm)
    with apply(lm, "ablation", edit):
        paper = _logits(lm, input_ids, mask)
    with apply(lm, "weighted_ablation", edit):
        weighted = _logits(lm, input_ids, mask)
    torch.testing.assert_close(weighted[mask.bool()], paper[mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_recorded_is_the_intervention_the_edit_record_names_and_the_papers_ablation_otherwise(tiny_lm, family):
    """With eval.edit=search, `recorded` evaluates the chosen trial as the search measured it; `ablation` would
    remove the trial's direction at full strength instead."""
    lm = tiny_lm(family)
    input_ids, mask = _batch(lm)
    out = {}
    for label, edit, name in (("trial", _trial_edit(lm), "weighted_ablation"), ("trial", _trial_edit(lm), "recorded"),
                              ("full", _trial_edit(lm), "ablation"), ("paper", _edit(lm), "ablation"),
                              ("paper", _edit(lm), "recorded")):
        with apply(lm, name, edit):
            out.setdefault(label, []).append(_logits(lm, input_ids, mask)[mask.bool()])
    assert torch.equal(*out["trial"]) and torch.equal(*out["paper"])
    assert not torch.allclose(out["trial"][0], out["full"][0], atol=1e-3), "the trial's kernel should matter"


def test_kernel_peaks_at_its_position_and_is_zero_beyond_its_width():
    weights = Kernel(peak=1.0, position=3, floor=0.2, width=2).weights(8)
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.2, 0.6, 1.0, 0.6, 0.2, 0.0, 0.0]))
    assert torch.equal(Kernel().weights(5), torch.ones(5))


@pytest.mark.parametrize("family", ["qwen2", "llama3", "gemma2"])
def test_ablating_a_basis_removes_the_whole_subspace_at_every_layer(tiny_lm, family):
    lm = tiny_lm(family)
    basis = torch.randn(2, lm.d_model, generator=torch.Generator().manual_seed(7))
    input_ids, mask = _batch(lm)
    with torch.no_grad(), apply(lm, "ablation", Edit.of(basis, 1, lm.n_layers)):
        resid = _residuals(lm, input_ids, mask)
    for layer, x in enumerate(resid):
        for r in basis:
            assert (x @ unit(r)).abs().max() < 1e-4 * x.norm(dim=-1).max(), f"layer {layer} keeps a component"


def test_stacked_rows_are_alternatives_and_unstacked_rows_a_basis(tiny_lm):
    lm = tiny_lm("qwen2")
    pair = torch.randn(2, lm.d_model, generator=torch.Generator().manual_seed(8))
    input_ids, mask = _batch(lm, PROMPTS[:2])
    doubled, doubled_mask = torch.cat([input_ids, input_ids]), torch.cat([mask, mask])
    with apply(lm, "ablation", Edit.of(pair, 1, lm.n_layers), stacked=True):
        stacked = _logits(lm, doubled, doubled_mask)
    for i in range(2):
        with apply(lm, "ablation", Edit.of(pair[i], 1, lm.n_layers)):
            alone = _logits(lm, input_ids, mask)
        torch.testing.assert_close(stacked[2 * i : 2 * i + 2][mask.bool()], alone[mask.bool()], rtol=1e-4, atol=1e-4)
    with apply(lm, "ablation", Edit.of(pair, 1, lm.n_layers)):
        basis = _logits(lm, input_ids, mask)
    assert not torch.allclose(basis, stacked[:2], atol=1e-3)


def test_projected_direction_is_orthogonal_to_the_harmless_mean(tiny_lm):
    lm = tiny_lm("qwen2")
    edit = _edit(lm)
    p = projected(edit).direction
    assert abs(float(p @ edit.harmless_mean)) < 1e-4 * float(p.norm() * edit.harmless_mean.norm())
    assert float(unit(p) @ unit(edit.direction)) > 0.1  # still mostly the refusal direction


@pytest.mark.parametrize("family", ["qwen2", "llama3", "mistral"])
def test_norm_preserving_ablation_removes_r_keeps_each_written_vectors_norm_and_is_undone(tiny_lm, family):
    lm = tiny_lm(family, tie=True)
    edit = _edit(lm)
    u = unit(edit.direction)
    block = lm.adapter.blocks(lm.model)[1]
    o_proj = lm.adapter.output_projections(block)[0]
    before = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    input_ids, mask = _batch(lm)
    original = _logits(lm, input_ids, mask)
    with apply(lm, "norm_preserving_ablation", edit):  # hooks: the weights stay as they are
        assert all(torch.equal(p, before[name]) for name, p in lm.model.named_parameters())
        hooked = _logits(lm, input_ids, mask)
    with edited_in_place(lm.model, lm.adapter):
        INTERVENTIONS["norm_preserving_ablation"].fold(lm.model, lm.adapter, edit)
        columns = o_proj.weight.float()
        assert (u @ columns).abs().max() < 1e-5  # no column writes along r
        torch.testing.assert_close(columns.norm(dim=0), before[_name(lm, o_proj)].norm(dim=0), rtol=1e-5, atol=1e-6)
        rows = lm.adapter.embedding(lm.model).weight
        torch.testing.assert_close(rows.norm(dim=1), before[_name(lm, lm.adapter.embedding(lm.model))].norm(dim=1),
                                   rtol=1e-5, atol=1e-6)
        edited = _logits(lm, input_ids, mask)
    assert not torch.allclose(edited, original, atol=1e-3)
    torch.testing.assert_close(hooked[mask.bool()], edited[mask.bool()], rtol=1e-4, atol=1e-4)
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} not restored"
    assert lm.model.get_output_embeddings().weight is lm.adapter.embedding(lm.model).weight  # re-tied
    torch.testing.assert_close(_logits(lm, input_ids, mask), original, rtol=0, atol=0)


def _name(lm, module) -> str:
    return next(n for n, m in lm.model.named_modules() if m is module) + ".weight"


@pytest.mark.parametrize("family", sorted(POST_NORM))
@pytest.mark.parametrize("name", FOLDABLE)
def test_post_norm_families_refuse_every_weight_edit(tiny_lm, family, name):
    from pipeline.errors import PipelineError

    lm = tiny_lm(family)
    with pytest.raises(PipelineError, match="Gemma 2/3"):
        INTERVENTIONS[name].fold(lm.model, lm.adapter, _edit(lm))
    if name == "norm_preserving_ablation":  # defined on the weights: its hooks refuse too
        with pytest.raises(PipelineError, match="Gemma 2/3"):
            apply(lm, name, _edit(lm)).__enter__()


def test_an_unknown_intervention_names_the_registered_ones():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="projected_ablation"):
        get_intervention("jailbreak")


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_one_direction_per_layer_folds_into_the_weights_as_its_hooks_do(tiny_lm, family):
    lm = tiny_lm(family)
    per_layer = torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(9))
    edit = Edit(per_layer, 1, lm.n_layers, torch.full((lm.n_layers,), 0.7), torch.ones(lm.n_layers), per_layer=True)
    input_ids, mask = _batch(lm)
    with apply(lm, "weighted_ablation", edit):
        hooked = _logits(lm, input_ids, mask)
    INTERVENTIONS["weighted_ablation"].fold(lm.model, lm.adapter, edit)
    torch.testing.assert_close(_logits(lm, input_ids, mask)[mask.bool()], hooked[mask.bool()], rtol=1e-4, atol=1e-4)


def test_a_new_intervention_is_one_registered_function_and_one_condition(tiny_lm, monkeypatch):
    """The README's example: register a function, name it in eval.conditions, and the stages accept it."""
    from omegaconf import OmegaConf

    from pipeline import interventions
    from pipeline.conditions import eval_conditions

    monkeypatch.setattr(interventions, "INTERVENTIONS", dict(INTERVENTIONS))

    @interventions.register("double_addition")
    def double_addition(model, adapter, edit, stacked=False):
        """Activation addition of 2·coeff·r at the edit's addition layer."""
        return activation_addition(model, adapter, edit.direction, edit.addition_layer, 2 * edit.addition_coeff)

    conditions = OmegaConf.create({"harmless_double_addition": {"prompts": "harmless",
                                                                "intervention": "double_addition"}})
    (_, name), = eval_conditions(conditions, OmegaConf.create({})).values()
    interventions.check_names([name], "eval.conditions")
    lm = tiny_lm("qwen2")
    edit = _edit(lm)
    input_ids, mask = _batch(lm)
    with apply(lm, "addition", Edit.of(2 * edit.direction, edit.layer, lm.n_layers)):
        twice = _logits(lm, input_ids, mask)
    with apply(lm, name, edit):
        torch.testing.assert_close(_logits(lm, input_ids, mask), twice)


@pytest.mark.parametrize("family", ["qwen2", "llama3", "gemma2"])
def test_conditions_decoded_together_get_the_completions_each_gets_alone(tiny_lm, family, monkeypatch, tmp_path):
    """Evaluation stages decode all hook conditions in shared batches, each intervention acting on its own
    condition's rows; a weight edit (norm-preserving ablation) runs alone. Every completion must be the one
    its condition gets when it is generated by itself, stopped at the same phrases."""
    from pipeline.checkpoint import Checkpoint
    from pipeline.generation import completion_tokens, condition_tokens, decode
    from pipeline.inference import Runner
    from pipeline.interventions import Edits

    lm = tiny_lm(family)
    edits = Edits(lm, {"select": _edit(lm), "search": _trial_edit(lm)}, default="select")
    jobs = {"harmful_baseline": ("baseline", PROMPTS), "harmful_ablation": ("ablation", PROMPTS),
            "harmless_addition": ("addition", PROMPTS[::-1][:3]), "subtraction": ("subtraction", PROMPTS[1:]),
            "projected": ("projected_ablation", PROMPTS), "trial": ("recorded@search", PROMPTS[2:])}
    if family not in POST_NORM:  # these refuse weight edits
        jobs["norm_preserving"] = ("norm_preserving_ablation", PROMPTS)
    encoded = {key: (reference, lm.encode(texts)) for key, (reference, texts) in jobs.items()}
    alone = {}
    for key, (reference, prompts) in encoded.items():
        with edits.apply(reference):
            alone[key] = completion_tokens(lm, prompts, 6, 8, key)
    stop_at = [decode(lm, alone["harmful_ablation"][0][:2])]  # a "refusal phrase" some rows write
    with edits.apply("ablation"):
        stopped = completion_tokens(lm, encoded["harmful_ablation"][1], 6, 8, "stopped", stop_at=stop_at)
    assert len(stopped[0]) < len(alone["harmful_ablation"][0])

    grouped = []
    generate = Runner.generate
    monkeypatch.setattr(Runner, "generate",
                        lambda self, *a, **k: grouped.append(k.get("groups")) or generate(self, *a, **k))
    together = condition_tokens(lm, edits, encoded, 6, 8, "together", Checkpoint(tmp_path / "all"))
    assert together == alone
    assert together["harmful_ablation"] != together["harmful_baseline"], "the interventions should matter"
    # every condition at once: the norm-preserving edit too is hooks
    assert len(grouped) == 1 and grouped[0].count == 6 + (family not in POST_NORM)
    with_stops = condition_tokens(lm, edits, encoded, 6, 8, "together, stopped", Checkpoint(tmp_path / "stopped"),
                                  stop_at)
    assert with_stops["harmful_ablation"] == stopped


def test_a_kept_condition_is_reused_only_for_the_same_record_prompts_and_budget(tiny_lm, monkeypatch, tmp_path):
    """A kept checkpoint hands back a condition's completions on a rerun; another edit record, other
    prompts or another budget decode that condition again (and only that one)."""
    from pipeline.checkpoint import Checkpoint
    from pipeline.generation import condition_tokens
    from pipeline.inference import Runner
    from pipeline.interventions import Edits

    lm = tiny_lm("qwen2")
    edits = Edits(lm, {"select": _edit(lm), "search": _trial_edit(lm)}, default="select")
    encoded = {"harmful_ablation": ("ablation", lm.encode(PROMPTS)), "trial": ("recorded@search", lm.encode(PROMPTS))}
    store = Checkpoint(tmp_path)
    first = condition_tokens(lm, edits, encoded, 6, 8, "first", store)
    decoded, generate = [], Runner.generate
    monkeypatch.setattr(Runner, "generate", lambda self, prompts, *a, **k: decoded.append(len(prompts))
                        or generate(self, prompts, *a, **k))
    assert condition_tokens(lm, edits, encoded, 6, 8, "again", store) == first and decoded == []
    fewer = {**encoded, "harmful_ablation": ("ablation", lm.encode(PROMPTS[1:]))}
    again = condition_tokens(lm, edits, fewer, 6, 8, "other prompts", store)
    assert again["harmful_ablation"] == first["harmful_ablation"][1:] and decoded == [len(PROMPTS) - 1]
    another_trial = Edits(lm, {"select": _edit(lm), "search": _edit(lm)}, default="select")
    condition_tokens(lm, another_trial, encoded, 6, 8, "other record", store)
    assert decoded[1:] == [len(PROMPTS)]  # the trial alone
    condition_tokens(lm, edits, encoded, 4, 8, "other budget", store)
    assert decoded[2:] == [2 * len(PROMPTS)]  # both, together
