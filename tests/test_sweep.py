"""Sweeps: one folder per job, stage reuse on re-runs, and the cross-model comparison."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import wandb
import yaml
from omegaconf import OmegaConf

from conftest import TINY_SETTINGS, copy_project, model_config, nested, run_ok, subprocess_env, tiny_data
from pipeline.compare import Run, bar_chart, labels, markdown, runs_from_dirs, runs_from_dvc_exp_show, table
from pipeline.compare import main as compare_main
from pipeline.sweep import MAX_OVERRIDES_CHARS, job_dir
from wandb_records import records


def test_job_folders_are_distinct_and_short():
    assert job_dir("m", "offline", "") == "m__offline"
    assert job_dir("m", "offline", "eval.max_new_tokens=8") == "m__offline__eval.max_new_tokens=8"
    long_a, long_b = ("x=" + "1" * 200 + suffix for suffix in ("a", "b"))
    assert job_dir("m", "d", long_a) != job_dir("m", "d", long_b)
    assert len(job_dir("m", "d", long_a)) <= len("m__d__") + MAX_OVERRIDES_CHARS


def _metrics(harmful, ablated, harmless, added, layer=6, n_layers=24):
    return {
        "refusal": {
            "refusal_rate": {
                "harmful_baseline": harmful,
                "harmful_ablation": ablated,
                "harmful_subtraction": ablated,
                "harmless_baseline": harmless,
                "harmless_addition": added,
            }
        },
        "select": {"layer": layer, "layer_fraction": round(layer / n_layers, 4), "position": -1, "kl": 0.02},
        "loss": {
            "ce_loss": {
                "general_text": {"delta_ablation": 0.01},
                "harmless_completions": {"delta_ablation": 0.03},
            }
        },
    }


def _job(root: Path, model: str, metrics: dict | None, status: dict | None = None, direction: dict | None = None,
         ) -> Path:
    job = root / (f"{model}__offline" + (f"__{direction['name']}" if direction else ""))
    (job / "metrics").mkdir(parents=True)
    params = {"model": {"name": model}, "data": {"name": "offline"}, **({"direction": direction} if direction else {})}
    (job / "params.yaml").write_text(yaml.safe_dump(params))
    for stage, values in (metrics or {}).items():
        (job / "metrics" / f"{stage}.json").write_text(json.dumps(values))
    if status:
        (job / "status.json").write_text(json.dumps(status))
    return job


def test_comparison_table_and_figure_from_sweep_folders(tmp_path):
    sweep = tmp_path / "runs" / "s"
    _job(sweep, "model-a", _metrics(0.9, 0.1, 0.0, 0.8))
    _job(sweep, "model-b", _metrics(0.7, 0.2, 0.1, 0.6, layer=3, n_layers=12))
    _job(sweep, "model-c", None, {"status": "failed", "stage": "filter", "error": "no harmful train prompt"})
    _job(sweep, "model-d", {"refusal": _metrics(1, 0, 0, 1)["refusal"]})  # unfinished: skipped
    frame = table(runs_from_dirs([sweep]))
    assert list(frame.model) == ["model-a", "model-b", "model-c"]
    a = frame.iloc[0]
    assert (a.refusal_harmful_baseline, a.refusal_harmful_ablation, a.refusal_harmless_addition) == (
        0.9,
        0.1,
        0.8,
    )
    assert (a.kl_harmless_ablation, a.ce_delta_ablation_general, a.layer_fraction) == (0.02, 0.01, 0.25)
    assert frame.iloc[1].layer_fraction == 0.25 and frame.iloc[1].layer == 3
    assert frame.iloc[2].status == "failed in filter: no harmful train prompt"
    assert pd.isna(frame.iloc[2].refusal_harmful_baseline)
    text = markdown(frame)
    assert text.count("\n") == 2 + 3 and "| model-a | offline | dim | 0.9 | 0.1 |" in text
    bar_chart(frame.iloc[:2], tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_direction_methods_are_compared_on_one_model_in_one_table_and_in_wandb(tmp_path, monkeypatch):
    """`direction=dim,cone,cosmic` as a sweep: one row per method with its refusal, over-refusal, KL, CE and
    selection time; the figure tells the runs apart; `--wandb` logs table and figure as one run."""
    sweep = tmp_path / "runs" / "methods"
    for name, extra, seconds in (("dim", {}, 600.0), ("cone", {"k": 3}, 650.0), ("cosmic", {}, 200.0)):
        metrics = _metrics(0.9, 0.05 if name == "cone" else 0.1, 0.0, 0.8)
        metrics["select"]["selection_seconds"] = seconds
        metrics["loss"]["kl_harmless_test"] = {"ablation": 0.03}
        if name != "cosmic":
            metrics["over_refusal"] = {"refusal_rate": {"baseline": 0.2, "ablation": 0.05}}
        _job(sweep, "model-a", metrics, direction={"name": name, **extra})
    frame = table(runs_from_dirs([sweep]))
    assert list(frame.method) == ["cone (k=3)", "cosmic", "dim"]
    assert list(frame.selection_seconds) == [650.0, 200.0, 600.0]
    assert frame.refusal_harmful_ablation[0] == 0.05 and frame.kl_harmless_test_ablation.tolist() == [0.03] * 3
    assert frame.over_refusal_ablation[0] == 0.05 and pd.isna(frame.over_refusal_ablation[1])  # cosmic had none
    assert len(set(labels(frame))) == 3
    assert "| direction method |" in markdown(frame) and "| model-a | offline | cosmic | 0.9 |" in markdown(frame)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the project's conf/ gives the tracking settings
    compare_main([str(sweep), "--out", str(tmp_path / "comparison"), "--wandb"])
    assert (tmp_path / "comparison" / "comparison.md").exists()
    wandb.teardown()  # the W&B service writes the run file after finish() returns; teardown waits for it
    (run_file,) = (tmp_path / "wandb").rglob("run-*.wandb")
    logged = {"/".join(item.nested_key or [item.key]) for r in records(run_file) if r.HasField("history")
              for item in r.history.item}
    assert {"tables/comparison/nrows", "figures/refusal_rates/path"} <= logged


def test_comparison_reads_dvc_experiments():
    """The shape of `dvc exp show --json` (DVC 3): the workspace, then a baseline commit with its experiments
    under it; the commit's own committed metrics are not a run."""

    def entry(name, model, metrics):
        files = {f"metrics/{stage}.json": {"data": values} for stage, values in metrics.items()}
        return {
            "rev": "abc",
            "name": name,
            "data": {
                "rev": "abc",
                "metrics": files,
                "params": {"params.yaml": {"data": {"model": {"name": model}, "data": {"name": "offline"}}}},
            },
        }

    def group(name, model, metrics, state=None):
        return {
            "name": name,
            "executor": {"state": state} if state else None,
            "revs": [entry(name, model, metrics)],
        }

    records = [
        {**entry(None, "model-w", _metrics(0.7, 0.0, 0.0, 0.7)), "rev": "workspace"},
        {
            **entry(None, "base", _metrics(0.7, 0.0, 0.0, 0.7)),  # a commit's committed metrics: not a run
            "experiments": [
                group("exp-one", "model-a", _metrics(0.9, 0.1, 0.0, 0.8)),
                group("exp-two", "model-b", _metrics(0.5, 0.0, 0.0, 0.5), "success"),
                group("exp-running", "model-c", _metrics(0.5, 0.0, 0.0, 0.5), "running"),
                group("exp-failed", "model-d", {"select": _metrics(1, 0, 0, 1)["select"]}, "failed"),
            ],
        }
    ]
    runs = runs_from_dvc_exp_show(records)
    assert [(r.source, r.params["model"]["name"], r.status) for r in runs] == [
        ("dvc:abc", "model-w", "finished"),
        ("dvc:exp-one", "model-a", "finished"),
        ("dvc:exp-two", "model-b", "finished"),
        ("dvc:exp-failed", "model-d", "failed (dvc queue logs)"),
    ]
    assert table([Run("x", runs[1].params, runs[1].metrics)]).iloc[0].refusal_harmful_ablation == 0.1
    assert runs[3].metrics == {}  # what `dvc exp show` reports for a failed experiment is its baseline's


def _tiny_sweep_project(tmp_path: Path) -> Path:
    """The project copy with a tiny model and data as conf/ options, and a `tiny` sweep config."""
    project, model_dir = copy_project(tmp_path)
    conf = project / "conf"
    (conf / "model" / "tiny-qwen2.yaml").write_text(OmegaConf.to_yaml(model_config("qwen2", model_dir)))
    (conf / "data" / "tiny.yaml").write_text(yaml.safe_dump(tiny_data()))
    sweep = OmegaConf.merge(nested(TINY_SETTINGS), {
        "sweep": {"name": "tiny"},
        "hydra": {"sweeper": {"params": {"model": "tiny-qwen2", "data": "tiny"}}},
    })
    (conf / "sweep" / "tiny.yaml").write_text("# @package _global_\n" + OmegaConf.to_yaml(sweep))
    return project


def _status(job: Path) -> dict[str, str]:
    return json.loads((job / "status.json").read_text())["stages"]


@pytest.mark.slow
def test_hydra_multirun_runs_each_job_in_its_folder_and_reuses_unchanged_stages(tmp_path):
    project = _tiny_sweep_project(tmp_path)
    env = subprocess_env(tmp_path)
    sweep = [sys.executable, "-m", "pipeline.sweep", "-m", "+sweep=tiny"]
    run_ok([*sweep, "eval.max_new_tokens=3,4", "hydra/launcher=parallel"], project, env)  # joblib, 2 at once
    jobs = sorted((project / "runs" / "tiny").iterdir())
    jobs = [j for j in jobs if j.is_dir()]
    assert [j.name for j in jobs] == [
        "tiny-qwen2__tiny__eval.max_new_tokens=3",
        "tiny-qwen2__tiny__eval.max_new_tokens=4",
    ]
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    for job in jobs:  # the same relative outputs as `dvc repro`, in each job's folder
        assert set(_status(job).values()) == {"ran"} and list(_status(job)) == stages
        for out in (
            "params.yaml",
            "metrics/refusal.json",
            "artifacts/select/edit.safetensors",
            "artifacts/orthogonalized_model/config.json",
            "reports/summary.md",
            "plots/select/kl.png",
        ):
            assert (job / out).exists(), out
    params = yaml.safe_load((jobs[0] / "params.yaml").read_text())
    assert params["eval"]["max_new_tokens"] == 3 and "sweep" not in params
    assert Path(params["data"]["harmful"]["pool"]["path"]).is_absolute()  # relative to the launch folder

    run_ok([*sweep, "eval.max_new_tokens=3"], project, env)  # same job again: everything reused
    assert set(_status(jobs[0]).values()) == {"reused"}

    tiny = project / "conf" / "sweep" / "tiny.yaml"  # a changed evaluation setting keeps the activations
    tiny.write_text(tiny.read_text().replace("max_documents: 3", "max_documents: 2"))
    run_ok([*sweep, "eval.max_new_tokens=3"], project, env)
    # loss re-runs, and what reads its metrics: the export's model card and the report
    assert [s for s, how in _status(jobs[0]).items() if how == "ran"] == ["loss", "export", "report"]

    out = run_ok([sys.executable, "-m", "pipeline.compare", "runs/tiny", "--out", "runs/cmp"], project, env)
    assert "tiny-qwen2" in out
    frame = pd.read_csv(project / "runs" / "cmp" / "comparison.csv")
    assert len(frame) == 2 and set(frame.status) == {"finished"}
    assert (project / "runs" / "cmp" / "refusal_rates.png").exists()
