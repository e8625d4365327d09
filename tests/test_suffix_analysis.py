"""Adversarial-suffix analysis: GCG is exact and resumable, head readouts add up, and the stages are opt-in."""

import json

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import HARMFUL, PROMPTS, run_stages
from pipeline.analysis import gcg
from pipeline.analysis.heads import REGIONS, eager_attention, head_readout, region_shares
from pipeline.checkpoint import Checkpoint
from pipeline.config import compose_config

TARGET = "Sure, here is"


def _objective(lm, texts=HARMFUL[:2]):
    n_post = lm.chat.n_post_instruction
    heads = [p[:-n_post] for p in lm.encode(texts)]
    target = lm.tokenizer(TARGET, add_special_tokens=False).input_ids
    return gcg.TargetLoss(lm, heads, lm.chat.suffix_ids, target), heads, target


def _allowed(lm):
    return gcg.allowed_tokens(lm.tokenizer, lm.model.get_input_embeddings().weight.shape[0])


def _full_loss(lm, heads, suffix_embeds, target):
    """Mean target cross-entropy over prompts from full forward passes (no cache), suffix given as embeddings."""
    embed = lm.model.get_input_embeddings()
    total = 0.0
    for head in heads:
        tail = torch.tensor([*lm.chat.suffix_ids, *target])
        embeds = torch.cat([embed(torch.tensor(head)), suffix_embeds, embed(tail)])[None]
        logits = lm.model(inputs_embeds=embeds).logits[0, -len(target) - 1:-1]
        total = total + torch.nn.functional.cross_entropy(logits, torch.tensor(target)) / len(heads)
    return total


def test_target_loss_and_gradient_with_cached_prompts_match_full_forward_passes(tiny_lm):
    lm = tiny_lm("qwen2")
    objective, heads, target = _objective(lm)
    candidates = torch.tensor([[300, 301, 302, 303], [310, 45, 200, 99]])
    losses, _ = objective.losses(candidates, batch_size=1)
    weight = lm.model.get_input_embeddings().weight
    for suffix, loss in zip(candidates, losses):
        torch.testing.assert_close(loss, _full_loss(lm, heads, weight[suffix], target).detach(), rtol=1e-4, atol=1e-4)
    one_hot = torch.nn.functional.one_hot(candidates[0], weight.shape[0]).float().requires_grad_(True)
    _full_loss(lm, heads, one_hot @ weight, target).backward()
    torch.testing.assert_close(objective.gradient(candidates[0]), one_hot.grad, rtol=1e-4, atol=1e-5)


def test_gcg_lowers_the_target_loss_using_allowed_tokens_only(tiny_lm):
    lm = tiny_lm("qwen2")
    objective, _, _ = _objective(lm)
    allowed = _allowed(lm)
    assert not allowed[lm.tokenizer.all_special_ids].any() and allowed.sum() > 100
    init = lm.tokenizer(" x x x x", add_special_tokens=False).input_ids
    result = gcg.optimise(objective, init, allowed, gcg.Settings(steps=4, search_width=16, top_k=16, seed=0))
    assert len(result.losses) == 5 and result.losses[-1] < result.losses[0]
    assert result.loss == min(result.losses)
    substituted = [t for t, i in zip(result.ids, init) if t != i]
    assert len(result.ids) == len(init) and substituted and allowed[substituted].all()
    torch.testing.assert_close(objective.losses(torch.tensor([result.ids]), 8)[0][0], torch.tensor(result.loss))


def test_candidates_change_one_position_to_one_of_its_top_k_tokens():
    suffix = torch.tensor([5, 6, 7])
    gradient = torch.zeros(3, 20)
    gradient[:, 10:14] = -1.0  # tokens 10-13 lower the loss most
    allowed = torch.ones(20, dtype=torch.bool)
    allowed[10] = False
    candidates = gcg.sample_candidates(suffix, gradient, allowed, 64, 3, torch.Generator().manual_seed(0))
    changed = candidates != suffix
    assert (changed.sum(1) == 1).all()
    assert set(candidates[changed].tolist()) == {11, 12, 13}


def test_gcg_resumed_from_its_checkpoint_follows_the_uninterrupted_trajectory(tiny_lm, tmp_path):
    lm = tiny_lm("qwen2")
    objective, _, _ = _objective(lm, HARMFUL[:1])
    allowed = _allowed(lm)
    init = lm.tokenizer(" x x x x", add_special_tokens=False).input_ids
    settings = dict(search_width=8, top_k=8, seed=3, early_stop=False, checkpoint_every=2)
    reference = gcg.optimise(objective, init, allowed, gcg.Settings(steps=5, **settings))
    store = Checkpoint(tmp_path)
    gcg.optimise(objective, init, allowed, gcg.Settings(steps=2, **settings), store)  # "killed" after step 2
    assert len(store.get("gcg")["losses"]) == 3
    resumed = gcg.optimise(objective, init, allowed, gcg.Settings(steps=5, **settings), store)
    assert resumed.losses == reference.losses and resumed.ids == reference.ids


def test_random_suffix_is_seeded_and_uses_allowed_tokens():
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[[3, 7, 9, 11]] = True
    a, b = gcg.random_suffix(allowed, 12, seed=1), gcg.random_suffix(allowed, 12, seed=1)
    assert a == b and len(a) == 12 and set(a) <= {3, 7, 9, 11}
    assert gcg.random_suffix(allowed, 12, seed=2) != a


def test_suffix_ids_go_between_the_instruction_and_the_post_instruction_tokens(tiny_lm):
    lm = tiny_lm("qwen2")
    plain = lm.encode(PROMPTS[:2])
    suffixed = lm.encode(PROMPTS[:2], [301, 302])
    n_post = lm.chat.n_post_instruction
    for p, s in zip(plain, suffixed):
        assert s == p[:-n_post] + [301, 302] + p[-n_post:]


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_head_contributions_add_up_and_attention_matches_transformers(tiny_lm, family):
    lm = tiny_lm(family)
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(5))
    prompts = lm.encode(PROMPTS, [301, 302, 303])
    blocks = lm.adapter.blocks(lm.model)
    with eager_attention(lm.model):
        readout = head_readout(lm, prompts, direction, batch_size=2)  # padded batches, several of them
        for index in (0, 2):
            outputs: dict[int, torch.Tensor] = {}
            handles = [lm.adapter.attention_output(b).register_forward_hook(
                lambda m, a, o, l=l, seen=outputs: seen.__setitem__(l, o[0, -1])) for l, b in enumerate(blocks)]
            with torch.no_grad():
                full = lm.model(input_ids=torch.tensor([prompts[index]]), output_attentions=True)
            for handle in handles:
                handle.remove()
            unit = direction / direction.norm()
            along = torch.stack([outputs[l] @ unit for l in range(len(blocks))])
            torch.testing.assert_close(readout.contribution[index].sum(-1), along, rtol=1e-4, atol=1e-4)
            want = torch.stack([a[0, :, -1] for a in full.attentions])
            torch.testing.assert_close(readout.attention[index], want, rtol=1e-4, atol=1e-5)
    assert lm.model.config._attn_implementation != "eager"
    for attention in readout.attention:
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:2]))
        shares = region_shares(attention, len(lm.chat.prefix_ids), 3, lm.chat.n_post_instruction)
        assert shares.shape[-1] == len(REGIONS)
        torch.testing.assert_close(shares.sum(-1), torch.ones(attention.shape[:2]))
        assert (shares[..., REGIONS.index("suffix")] > 0).all()


def test_head_readout_refuses_attention_implementations_without_probabilities(tiny_lm):
    lm = tiny_lm("qwen2")
    with pytest.raises(RuntimeError, match="eager_attention"):
        head_readout(lm, lm.encode(PROMPTS[:1]), torch.ones(lm.d_model), batch_size=1)


def test_analysis_is_off_by_default_and_dvc_exp_run_s_analysis_suffix_turns_it_on(tmp_path):
    from dvc.utils.hydra import compose_and_dump

    from pipeline.config import CONF_DIR

    assert compose_config().analysis.enabled is False
    compose_and_dump(tmp_path / "params.yaml", str(CONF_DIR), None, "config", str(tmp_path), ["analysis=suffix"])
    enabled = yaml.safe_load((tmp_path / "params.yaml").read_text())["analysis"]  # what `dvc exp run -S` writes
    assert enabled["enabled"] is True
    off = OmegaConf.to_container(compose_config().analysis)
    assert {k: v for k, v in off.items() if k not in ("name", "enabled")} == \
        {k: v for k, v in enabled.items() if k not in ("name", "enabled")}


ANALYSIS = ("suffix", "geometry", "heads")


def _metrics(project, stage):
    return json.loads((project / "metrics" / f"{stage}.json").read_text())


def test_disabled_analysis_stages_only_say_so(selected_project):
    run_stages(selected_project, *ANALYSIS)
    for stage in ANALYSIS:
        assert _metrics(selected_project, stage) == {"enabled": False}
        assert not any((selected_project / "artifacts" / stage).iterdir())
        assert not any((selected_project / "plots" / stage).iterdir())


def test_enabled_analysis_optimises_a_suffix_and_writes_figures_and_metrics(selected_project):
    settings = {"analysis.enabled": True, "analysis.gcg.steps": 2, "analysis.gcg.search_width": 8,
                "analysis.gcg.n_prompts": 2, "analysis.gcg.init": "' x x x'", "analysis.heads.top_k": 3}
    run_stages(selected_project, *ANALYSIS, **settings)
    record = json.loads((selected_project / "artifacts" / "suffix" / "suffix.json").read_text())
    assert record["source"] == "gcg" and len(record["optimised_on"]) == 2
    suffix, geometry, heads = (_metrics(selected_project, s) for s in ANALYSIS)
    assert len(record["adversarial"]["ids"]) == len(record["random"]["ids"]) == suffix["n_suffix_tokens"] > 0
    assert suffix["gcg"]["steps_run"] == 2 and suffix["gcg"]["best_loss"] <= suffix["gcg"]["initial_loss"]
    sets = {"harmful", "harmful_adversarial", "harmful_random", "optimised", "optimised_adversarial",
            "optimised_random"}
    assert set(suffix["refusal_rate"]) == sets
    assert set(geometry["cosine_at_layer"]["last_token"]) == sets | {"harmless"}
    assert set(geometry["gap_closed"]["last_token"]) == {s for s in sets if "_" in s}
    assert len(heads["top_heads"]) == 3 and heads["top_heads_attention_suffix"]["harmful"] == 0
    assert heads["top_heads_attention_suffix"]["harmful_adversarial"] > 0
    verdicts = json.loads((selected_project / "artifacts" / "suffix" / "verdicts.json").read_text())
    assert set(verdicts) == sets and {"instruction", "response", "refusal"} == set(verdicts["harmful"][0])
    pngs = {p.relative_to(selected_project / "plots").as_posix() for p in (selected_project / "plots").rglob("*.png")}
    assert {"suffix/gcg_loss.png", "geometry/cosine_by_layer.png", "geometry/projections.png",
            "geometry/candidate_similarity.png", "heads/top_heads.png"} <= pngs
    assert not list((selected_project / "artifacts" / "checkpoints" / "suffix").glob("*/*.json"))


def test_a_suffix_given_in_config_is_analysed_without_optimisation(selected_project):
    run_stages(selected_project, "suffix", **{"analysis.enabled": True, "analysis.gcg.suffix": "' describing.'"})
    record = json.loads((selected_project / "artifacts" / "suffix" / "suffix.json").read_text())
    assert record["source"] == "config" and record["optimised_on"] == []
    assert record["adversarial"]["text"] == " describing."
    metrics = _metrics(selected_project, "suffix")
    assert "gcg" not in metrics and set(metrics["refusal_rate"]) == {"harmful", "harmful_adversarial", "harmful_random"}
