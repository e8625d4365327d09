"""Tracking plumbing: W&B mode and paths, artifact lineage, run provenance, secret redaction, saved views."""

import logging
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline import provenance, tracking, wandb_views
from pipeline.config import compose_config


def test_mode_environment_wins_and_online_needs_a_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert tracking.resolve_mode("online") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.resolve_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("online") == "disabled"


def test_run_dir_is_absolute_config_then_environment_then_cwd(monkeypatch, tmp_path):
    cfg = compose_config()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    assert tracking.run_dir(cfg) == tmp_path
    monkeypatch.setenv("WANDB_DIR", "from-env")
    assert tracking.run_dir(cfg) == tmp_path / "from-env"
    OmegaConf.update(cfg, "tracking.wandb.dir", "/abs/runs")
    assert tracking.run_dir(cfg) == Path("/abs/runs")


def test_names_come_from_config_and_the_dvc_experiment(monkeypatch):
    cfg = compose_config(["model=smollm2-135m-instruct"])
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-hare")
    assert tracking.run_name(cfg) == "smollm2-135m-instruct__offline__dim__paper__default__lucid-hare"
    assert tracking.run_group(cfg) == "offline__paper__default"
    OmegaConf.update(cfg, "tracking.wandb", {"name": "mine", "group": "sweep-1"})
    assert (tracking.run_name(cfg), tracking.run_group(cfg)) == ("mine", "sweep-1")


class _Run:
    """Records the calls W&B would receive."""

    def __init__(self, fail_log=False):
        self.calls: list[tuple[str, str]] = []
        self.fail_log = fail_log
        self.summary: dict = {}

    def log(self, payload):
        if self.fail_log:
            raise ConnectionError("upload failed")

    def log_artifact(self, artifact):
        self.calls.append(("log", artifact.name))
        artifact.wait = lambda: self.calls.append(("wait", artifact.name))
        return artifact

    def use_artifact(self, artifact):
        self.calls.append(("use", artifact.name))


def _specs(tmp_path):
    (tmp_path / "c.bin").write_bytes(b"c")
    (tmp_path / "d.bin").write_bytes(b"d")
    return [tracking.ArtifactSpec("cands", "candidate-directions", [tmp_path / "c.bin"]),
            tracking.ArtifactSpec("dir", "refusal-direction", [tmp_path / "d.bin"], inputs=["cands"])]


def test_online_the_direction_is_logged_after_declaring_the_candidates_as_input(tmp_path):
    run = _Run()
    tracking._log_artifacts(run, _specs(tmp_path), online=True)
    assert run.calls == [("log", "cands"), ("wait", "cands"), ("use", "cands"), ("log", "dir")]


def test_offline_lineage_is_kept_in_metadata(tmp_path):
    run = _Run()
    tracking._log_artifacts(run, _specs(tmp_path), online=False)
    assert run.calls == [("log", "cands"), ("log", "dir")]  # offline use_artifact raises in W&B


def test_a_failure_while_logging_still_finishes_the_run(monkeypatch, tmp_path, caplog):
    import wandb

    run = _Run(fail_log=True)
    run.dir, run.id = str(tmp_path / "offline-run-x" / "files"), "x"
    run.finish = lambda: run.calls.append(("finish", ""))
    monkeypatch.setattr(wandb, "init", lambda **kw: run)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config()
    OmegaConf.update(cfg, "tracking.wandb.dir", str(tmp_path))
    with caplog.at_level(logging.ERROR):
        where = tracking.log_run(cfg, tracking.RunRecord({}, {"a": 1}))
    assert "upload failed" in caplog.text and run.calls[-1] == ("finish", "")
    assert where == tmp_path / "offline-run-x"


def test_dvc_state_hashes_stages_and_checks_small_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.json").write_text("{}")
    Path("b.json").write_text("changed since the lock")
    lock = {"schema": "2.0", "stages": {
        "a": {"cmd": "x", "outs": [{"path": "a.json", "md5": "99914b932bd37a50b983c5e7c90ae93b", "size": 2}]},
        "b": {"cmd": "y", "outs": [{"path": "b.json", "md5": "99914b932bd37a50b983c5e7c90ae93b", "size": 2}]},
        "c": {"cmd": "z", "outs": [{"path": "d", "md5": "0123.dir", "size": 5}]},
    }}
    Path("dvc.lock").write_text(yaml.safe_dump(lock))
    state = provenance.dvc_state()
    assert state["lock"] and [state["stages"][s]["current"] for s in "abc"] == [True, False, None]
    assert state["stages"]["a"]["outs"] == {"a.json": "99914b932bd37a50b983c5e7c90ae93b"}
    assert len({s["hash"] for s in state["stages"].values()}) == 3
    assert provenance.dvc_state(Path("missing.lock")) == {"lock": False, "experiment": None, "stages": {}}


def test_git_state_ignores_generated_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for name in ("code.py", "params.yaml", "metrics/m.json"):
        Path(name).parent.mkdir(exist_ok=True)
        Path(name).write_text("1")
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], check=True, env={**env, "PATH": "/usr/bin:/bin"})
    generated = provenance.generated_paths({"s": {"outs": [{"path": "metrics/m.json"}]}})
    Path("params.yaml").write_text("2")
    Path("metrics/m.json").write_text("2")
    state = provenance.git_state(generated)
    assert len(state["commit"]) == 40 and state["dirty"] is False
    Path("code.py").write_text("2")
    assert provenance.git_state(generated)["modified"] == ["code.py"]


def test_redact_blanks_credentials_but_not_token_counts():
    secrets = {"hf_abcdefghijklmnop"}
    cfg = {"eval": {"max_new_tokens": 64},
           "model": {"source": {"token": "x", "path": "/m/hf_abcdefghijklmnop"}},
           "WANDB_API_KEY": "k", "list": ["hf_abcdefghijklmnop"]}
    out = provenance.redact(cfg, secrets)
    assert out["eval"]["max_new_tokens"] == 64 and out["model"]["source"]["token"] == "<redacted>"
    assert out["model"]["source"]["path"] == "/m/<redacted>" and out["WANDB_API_KEY"] == "<redacted>"
    assert out["list"] == ["<redacted>"]
    assert provenance.secret_values({"HF_TOKEN": "hf_abcdefghijklmnop", "PATH": "/usr/bin:/bin"}) == secrets


KEYS = ["refusal/refusal_rate/harmful_baseline", "refusal/refusal_rate/harmless_addition", "select/layer",
        "brand_new/score", "figures/select/kl", "figures/refusal/refusal_rate", "tables/completions",
        "tables/selection_scores", "seconds/select", "seconds/total"]


def test_saved_views_are_built_from_the_logged_keys_without_network():
    headline = ["refusal/refusal_rate/*", "select/layer", "capabilities/*"]
    workspace = wandb_views.build_workspace("team", "refusal-direction", KEYS, headline, group="sweep-1")
    sections = {s.name: s.panels for s in workspace.sections}
    assert [p.title for p in sections["Headline"]] == KEYS[:3]
    assert sections["Figures"][0].media_keys == ["figures/select/kl", "figures/refusal/refusal_rate"]
    assert [p.table_name for p in sections["Tables"]] == ["tables/completions", "tables/selection_scores"]
    assert "sweep-1" in workspace.runset_settings.filters
    spec = workspace._to_model().model_dump_json(by_alias=True)  # what .save() would send
    assert "refusal/refusal_rate/harmless_addition" in spec and "tables/selection_scores" in spec
    report = wandb_views.build_report("team", "refusal-direction", KEYS, headline)
    assert [b.text for b in report.blocks if type(b).__name__ == "H2"] == list(sections)


def test_views_command_needs_an_entity(monkeypatch, tmp_path):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit, match="entity"):
        wandb_views.main(["--what", "workspace"])
