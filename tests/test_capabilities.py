"""The lm-eval stage: results per (variant, task), the saved edited model scores as hook ablation does."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import model_config
from pipeline.config import compose_config
from pipeline.edit import Edit, load_edit, save_edit
from pipeline.errors import ConfigError
from pipeline.interventions import get_intervention
from pipeline.models.loading import load_model
from pipeline.stages import capabilities


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_dir):
    """A working directory outside the project (as a sweep job's folder is) with an edit record."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    torch.manual_seed(1)
    save_edit(Path("artifacts/select"), Edit.of(torch.randn(64), 1, 4, position=-1))
    return tmp_path


def stage_config(tiny_dir, **capability_overrides):
    cfg = compose_config()
    model = OmegaConf.to_container(model_config("qwen2", tiny_dir("qwen2")))
    OmegaConf.update(cfg, "model", model, merge=False)
    OmegaConf.update(cfg, "runtime.device", "cpu")
    for key, value in capability_overrides.items():
        OmegaConf.update(cfg, f"eval.capabilities.{key}", value)
    return cfg


def sample_loglikelihoods(variant: str, task: str) -> list[float]:
    results = json.loads(Path(f"artifacts/capabilities/{variant}/{task}.json").read_text())
    return [float(r[0][0]) for s in results["samples"][task] for r in s["resps"]]


def test_each_variant_and_task_gets_lm_eval_results_and_headline_deltas(project, tiny_dir):
    capabilities.run(stage_config(tiny_dir, limit=4))
    metrics = json.loads(Path("metrics/capabilities.json").read_text())
    assert metrics["edited_model"] == "hooks"  # the orthogonalize stage saved no model here
    assert set(metrics["tasks"]) == {"rd_facts_mc", "rd_short_answer"}
    assert set(metrics["tasks"]["rd_facts_mc"]) == {"acc", "acc_norm"}
    assert set(metrics["tasks"]["rd_short_answer"]) == {"exact_match"}
    for by_metric in metrics["tasks"].values():
        for v in by_metric.values():
            assert v["delta"] == pytest.approx(v["orthogonalized"] - v["original"])
    for variant in capabilities.VARIANTS:
        for task in ("rd_facts_mc", "rd_short_answer"):
            results = json.loads(Path(f"artifacts/capabilities/{variant}/{task}.json").read_text())
            assert results["n-samples"][task]["effective"] == 4
            assert results["wall_seconds"] >= 0
    # the ablation hooks reached the model: the option log-likelihoods move
    assert sample_loglikelihoods("original", "rd_facts_mc") != pytest.approx(
        sample_loglikelihoods("orthogonalized", "rd_facts_mc"), abs=1e-3)


def test_an_interrupted_stage_resumes_at_the_next_task_with_the_same_results(project, tiny_dir, monkeypatch):
    import lm_eval

    cfg = stage_config(tiny_dir, limit=3)
    capabilities.run(cfg)
    uninterrupted = {p: p.read_bytes() for p in Path("artifacts/capabilities").rglob("*.json")}
    real, calls = lm_eval.simple_evaluate, []

    def dies_on_the_third_task(**kwargs):
        calls.append(kwargs["tasks"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(**kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", dies_on_the_third_task)
    with pytest.raises(KeyboardInterrupt):
        capabilities.run(cfg)
    calls.clear()
    capabilities.run(cfg)
    assert len(calls) == 2  # the original model's two tasks came from the checkpoint
    for path, data in uninterrupted.items():
        assert json.loads(path.read_text())["results"] == json.loads(data)["results"], path


def test_saved_orthogonalized_model_scores_exactly_as_hook_ablation(project, tiny_dir):
    cfg = stage_config(tiny_dir, limit=6, tasks=["rd_facts_mc"])
    capabilities.run(cfg)  # hooks: no saved model yet
    hooked = sample_loglikelihoods("orthogonalized", "rd_facts_mc")

    lm = load_model(cfg.model, "cpu")
    get_intervention("ablation").fold(lm.model, lm.adapter, load_edit(lm))
    lm.model.save_pretrained("artifacts/orthogonalized_model")
    lm.tokenizer.save_pretrained("artifacts/orthogonalized_model")

    OmegaConf.update(cfg, "eval.capabilities.edited_model", "saved")
    capabilities.run(cfg)
    assert json.loads(Path("metrics/capabilities.json").read_text())["edited_model"] == "saved"
    assert sample_loglikelihoods("orthogonalized", "rd_facts_mc") == pytest.approx(hooked, abs=1e-4)


def test_configuration_mistakes_are_reported(project, tiny_dir):
    with pytest.raises(ConfigError, match="no saved model"):
        capabilities.run(stage_config(tiny_dir, edited_model="saved"))
    with pytest.raises(ConfigError, match="edited_model"):
        capabilities.run(stage_config(tiny_dir, edited_model="weights"))
    with pytest.raises(ConfigError, match="no_such_task"):
        capabilities.run(stage_config(tiny_dir, tasks=["no_such_task"]))
