"""A tiny end-to-end `dvc repro` in a temporary copy of the project, then a second one that does nothing.

The run logs to W&B offline with credential-like variables set to a sentinel; the test reads the offline
run back (its record log and files), renders every DVC plot, and checks no file holds the sentinel.
"""

import json
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_project, run_ok, subprocess_env
from wandb_records import records

SENTINEL = "e2e-sentinel-key-0123456789"


def _offline_run(tmp: Path) -> tuple[Path, dict]:
    """The one offline run under the configured dir, and its records by type (config, summary, ...)."""
    (run_dir,) = (tmp / "wandb-runs" / "wandb").glob("offline-run-*")
    found: dict = {"summary": {}, "artifacts": {}, "files": set()}
    for record in records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["run"] = record.run
            found["config"] = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif kind == "summary":
            for update in record.summary.update:
                *parents, leaf = update.nested_key or [update.key]
                target = found["summary"]
                for parent in parents:
                    target = target.setdefault(parent, {})
                target[leaf] = json.loads(update.value_json)
        elif kind == "artifact":
            found["artifacts"][record.artifact.name] = record.artifact
        elif kind == "files":
            found["files"].update(f.path for f in record.files.files)
    return run_dir, found


def _check_wandb_run(tmp: Path) -> None:
    run_dir, found = _offline_run(tmp)
    assert found["run"].project == "refusal-direction" and found["run"].run_group == "tiny__paper__default"
    config = found["config"]
    assert config["model"]["name"] == "tiny-qwen2" and config["select"]["kl_threshold"] == 1e9
    assert {"commit", "dirty"} <= set(config["git"])
    assert config["dvc"]["lock"] and {"data", "select", "refusal"} <= set(config["dvc"]["stages"])
    assert config["dvc"]["stages"]["select"]["current"] is True
    summary = found["summary"]
    assert 0 <= summary["refusal/refusal_rate/harmless_addition"] <= 1
    assert {"select/layer", "loss/ce_loss/general_text/delta_ablation", "seconds/select", "seconds/total",
            "projections/last_token/test_separation"} <= set(summary)
    tables = {"completions", "interventions", "selection_scores", "cosine_by_layer", "capabilities"}
    figures = {"refusal/refusal_rate", "select/bypass_score", "select/kl", "projections/cosine_by_layer"}
    for name in tables:
        assert summary[f"tables/{name}"]["_type"] == "table-file"
        assert (run_dir / "files" / summary[f"tables/{name}"]["path"]).is_file()
    completions = json.loads((run_dir / "files" / summary["tables/completions"]["path"]).read_text())
    assert {"condition", "response", "refusal/refusal"} <= set(completions["columns"])
    assert len(completions["data"]) == 21  # 7 conditions x 3 test prompts
    interventions = json.loads((run_dir / "files" / summary["tables/interventions"]["path"]).read_text())
    assert [row[0] for row in interventions["data"]] == ["baseline", "ablation", "projected_ablation",
                                                          "norm_preserving_ablation", "subtraction", "addition"]
    for name in figures:
        assert summary[f"figures/{name}"]["_type"] == "image-file"
        assert (run_dir / "files" / summary[f"figures/{name}"]["path"]).is_file()
    candidates = found["artifacts"]["candidate-directions-tiny-qwen2"]
    direction = found["artifacts"]["refusal-edit-tiny-qwen2"]
    assert {e.path for e in direction.manifest.contents} == {"edit.safetensors", "edit.json"}
    assert json.loads(direction.metadata)["derived_from"] == [candidates.name]
    assert "candidates.safetensors" in {e.path for e in candidates.manifest.contents}


def _check_dvc_views(project: Path, env: dict) -> None:
    import vl_convert

    metrics = json.loads(run_ok(["dvc", "metrics", "show", "--json"], project, env).strip().splitlines()[-1])
    shown = json.dumps(metrics)
    for key in ("harmless_addition", "delta_ablation", "test_separation", "mean_kl_vs_hooks"):
        assert key in shown, key
    shown = run_ok(["dvc", "plots", "show", "--json"], project, env)
    plots = json.loads(shown.strip().splitlines()[-1])["data"]
    assert {"selection_scores", "refusal_rate", "cosine_last_token", "plots/select/kl.png"} <= set(plots)
    for name, items in plots.items():
        for item in items:
            if item["type"] == "vega":
                assert item["content"]["data"]["values"], name
                assert vl_convert.vegalite_to_svg(item["content"]).count("<path") > 3, name  # drew marks
    run_ok(["dvc", "plots", "show"], project, env)
    assert "vegaEmbed" in (project / "dvc_plots" / "index.html").read_text()


@pytest.mark.slow
def test_tiny_dvc_repro_runs_every_stage_then_does_nothing(tmp_path):
    project = make_tiny_project(tmp_path, **{"tracking.wandb.mode": "offline",
                                             "tracking.wandb.dir": str(tmp_path / "wandb-runs")})
    env = subprocess_env(tmp_path, WANDB_API_KEY=SENTINEL, HF_TOKEN=SENTINEL,
                         **{f"WANDB_{d}_DIR": str(tmp_path / f"wandb-{d}") for d in ("DATA", "CACHE", "CONFIG")})
    run_ok(["git", "init", "-q"], project, env)
    run_ok(["dvc", "init", "-q"], project, env)
    out = run_ok(["dvc", "repro"], project, env)
    for stage in yaml.safe_load((project / "dvc.yaml").read_text())["stages"]:
        assert f"Running stage '{stage}'" in out
    refusal = json.loads((project / "metrics" / "refusal.json").read_text())
    assert set(refusal["refusal_rate"]) == {"harmful_baseline", "harmful_ablation", "harmful_projected_ablation",
                                            "harmful_norm_preserving_ablation", "harmful_subtraction",
                                            "harmless_baseline", "harmless_addition"}
    loss = json.loads((project / "metrics" / "loss.json").read_text())
    assert set(loss["kl_harmless_test"]) == {"ablation", "projected_ablation", "norm_preserving_ablation",
                                             "addition", "subtraction"}
    assert json.loads((project / "metrics" / "safety.json").read_text())["judges"] == []  # none by default
    capabilities = json.loads((project / "metrics" / "capabilities.json").read_text())
    assert capabilities["edited_model"] == "saved"
    assert set(capabilities["tasks"]) == {"rd_facts_mc", "rd_short_answer"}
    assert (project / "artifacts" / "capabilities" / "orthogonalized" / "rd_short_answer.json").exists()
    over = json.loads((project / "metrics" / "over_refusal.json").read_text())
    assert set(over["refusal_rate"]) == {"baseline", "addition", "ablation", "projected_ablation",
                                         "norm_preserving_ablation", "subtraction"} and over["n_prompts"] == 6
    ortho = json.loads((project / "metrics" / "orthogonalize.json").read_text())
    assert ortho["mean_kl_vs_hooks"] < 1e-4
    assert (project / "artifacts" / "orthogonalized_model" / "config.json").exists()
    assert (project / "reports" / "summary.md").exists() and (project / "reports" / "report.html").exists()
    assert (project / "plots" / "select" / "bypass_score.png").exists()
    _check_wandb_run(tmp_path)
    _check_dvc_views(project, env)
    for path in tmp_path.rglob("*"):
        if path.is_file() and "cache" not in path.relative_to(tmp_path).parts[0]:
            assert SENTINEL.encode() not in path.read_bytes(), path
    again = run_ok(["dvc", "repro"], project, env)
    assert "Running stage" not in again
    assert "Data and pipelines are up to date" in again
