"""The report stage: reads every metrics file, escapes model output, survives W&B failures, leaks no key."""

import json
import logging
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from pipeline import figures, render
from pipeline.config import compose_config
from pipeline.edit import Edit, save_edit
from pipeline.io import save_tensors, write_json
from pipeline.stages import report

CONDITIONS = compose_config().eval.conditions

HOSTILE = ('<script>alert("x")</script> | col | `code` **bold** [link](javascript:alert(1)) ![i](http://e/x.png)\n'
           "# heading\n| --- |\n$x$ ~~s~~ <img src=x onerror=alert(1)> &amp;")
SENTINEL = "sentinel-secret-value-123456"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A finished run's outputs (tiny, synthetic), with the working directory set to it."""
    monkeypatch.chdir(tmp_path)
    n_pos, n_sites = 2, 4
    write_json("metrics/select.json", {"layer": 2, "position": -1, "kl": 0.05})
    write_json("metrics/refusal.json", {"refusal_rate": {c: 0.5 for c in CONDITIONS}})
    write_json("metrics/loss.json", {"ce_loss": {"general_text": {"delta_ablation": 0.01}},
                                     "kl_harmless_test": {"ablation": 0.02}})
    write_json("metrics/brand_new_stage.json", {"nested": {"score": 0.75}})  # a stage unknown to the report
    for stage, seconds in {"select": 3.0, "refusal": 1.0, "report": 99.0}.items():
        write_json(f"artifacts/timing/{stage}.json", {"stage": stage, "wall_seconds": seconds})
    rows = [{"position": p - n_pos, "position_label": f"t{p}", "layer": layer, "bypass_score": -layer,
             "induce_score": layer, "kl": 0.01 * layer, "status": "eligible"}
            for p in range(n_pos) for layer in range(n_sites)]
    Path("artifacts/select").mkdir(parents=True)
    pd.DataFrame(rows).to_csv("artifacts/select/scores.csv", index=False)
    save_edit(Path("artifacts/select"), Edit.of(torch.ones(8), 2, 3, position=-1, position_label="t1"))
    save_tensors("artifacts/directions/candidates.safetensors", {"directions": torch.ones(n_pos, n_sites, 8)})
    write_json("artifacts/directions/candidates.json", {"labels": ["t0", "t1"], "n_layers": 3, "d_model": 8})
    verdicts = {c: [{"instruction": f"prompt {i} {HOSTILE}", "category": None,
                     "response": f"{c} says {HOSTILE}", "refusal": i % 2 == 0} for i in range(3)]
                for c in CONDITIONS}
    write_json("artifacts/refusal/verdicts.json", verdicts)
    write_json("artifacts/safety/verdicts.json",  # a second judge: its verdicts join the same rows
               {c: [{"instruction": v["instruction"], "response": v["response"], "unsafe": True}
                    for v in items] for c, items in verdicts.items()})
    any_png = Path("plots/select/bypass_score.png")
    figures.refusal_bars(pd.DataFrame({"condition": ["a"], "rate": [0.5]}), any_png)
    Path("plots/projections").mkdir(parents=True)
    pd.DataFrame({"layer": range(n_sites), "harmful_test": 0.1, "harmless_test": 0.0}).to_csv(
        "plots/projections/cosine_last_token.csv", index=False)
    return tmp_path


def _cfg(**tracking):
    cfg = compose_config()
    OmegaConf.update(cfg, "report.n_examples", 2)
    OmegaConf.update(cfg, "tracking.wandb", {**cfg.tracking.wandb, "mode": "disabled", **tracking},
                     merge=False)
    OmegaConf.update(cfg, "model.source.token", SENTINEL, force_add=True)  # a key pasted into the config
    return cfg


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_markdown_escaping_leaves_no_markup_and_keeps_the_table_intact():
    text = render.md_text(HOSTILE)
    assert text.count("<br>") == HOSTILE.count("\n")  # the only markup: line breaks inside a table cell
    bare = re.sub(r"&#?\w+;", "", text.replace("<br>", ""))  # what is left once entities are dropped
    for raw in ("<", ">", "|", "`", "*", "[", "]", "\n", "$", "~", "#", "&"):
        assert raw not in bare, raw
    assert f"| a | {text} |".count("|") == 3


def test_report_outputs_escape_model_text(workspace):
    report.run(_cfg())
    page = Path("reports/report.html").read_text()
    parser = _Tags()
    parser.feed(page)
    assert "script" not in parser.tags
    assert parser.tags.count("img") == len(list(Path("reports/figures").glob("*.png")))  # the figures only
    assert "&lt;script&gt;alert" in page and "<script>" not in page
    md = Path("reports/summary.md").read_text()
    assert "<script" not in md and "](javascript" not in md and "<img" not in md
    for line in md.splitlines():
        if line.startswith("| harmful_baseline"):
            assert line.count("|") == 4, line  # condition | verdicts | response: no cell was split


def test_report_picks_up_every_metrics_file_and_timings(workspace):
    report.run(_cfg())
    summary = json.loads(Path("reports/summary.json").read_text())
    assert summary["metrics"]["brand_new_stage/nested/score"] == 0.75
    assert list(summary["headline"])[:2] == ["refusal/refusal_rate/harmful_baseline",
                                             "refusal/refusal_rate/harmful_ablation"]
    assert "brand_new_stage/nested/score" not in summary["headline"]
    # the report's own timing (from its previous run) is left out
    assert summary["wall_seconds"] == {"select": 3.0, "refusal": 1.0, "total": 4.0}
    long = pd.read_csv("plots/report/selection_scores.csv")
    assert set(long.metric) == {"bypass_score", "induce_score", "kl"} and long.chosen.sum() == 3
    assert pd.read_csv("plots/report/refusal_rate.csv").refusal_rate.tolist() == [0.5] * len(CONDITIONS)
    html = Path("reports/report.html").read_text()
    assert "brand_new_stage/nested/score" in html and "safety/unsafe" in html
    # the interventions side by side: one row each, what each stage measured for it
    md = Path("reports/summary.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.split("## Interventions side by side")[1].split("##")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| intervention")}
    assert list(rows) == ["baseline", "ablation", "projected_ablation", "norm_preserving_ablation", "subtraction",
                          "addition"]
    assert rows["ablation"][:3] == ["0.5", "–", "0.02"] and rows["ablation"][3] == "0.01"
    assert rows["addition"][:2] == ["–", "0.5"] and "Interventions side by side" in html


def test_a_cosmic_selection_is_reported_with_its_own_score(workspace):
    """direction=cosmic scores candidates by activation similarity alone: its table has no bypass, induce or KL
    columns, and the report draws its heatmap from the score it has."""
    scores = pd.read_csv("artifacts/select/scores.csv").drop(columns=["bypass_score", "induce_score", "kl"])
    scores.assign(cosmic_score=0.1 * scores.layer).to_csv("artifacts/select/scores.csv", index=False)
    report.run(_cfg())
    long = pd.read_csv("plots/report/selection_scores.csv")
    assert set(long.metric) == {"cosmic_score"} and len(long) == len(scores) and long.chosen.sum() == 1


def test_wandb_failure_is_logged_and_the_report_still_written(workspace, monkeypatch, caplog):
    import wandb

    def broken(**kwargs):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with caplog.at_level(logging.ERROR):
        report.run(_cfg(dir=str(workspace / "wb")))
    assert "W&B could not start" in caplog.text and "W&B is down" in caplog.text
    assert Path("reports/report.html").exists() and Path("reports/summary.md").exists()


def test_no_key_reaches_the_wandb_config_or_any_output(workspace, monkeypatch):
    import wandb

    seen = {}

    class FakeRun:
        dir = str(workspace / "wb" / "run" / "files")
        id = "fake"
        summary: dict = {}

        def log(self, payload):
            seen["log"] = payload

        def log_artifact(self, artifact):
            seen.setdefault("artifacts", []).append(artifact)
            return artifact

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(init=kw) or FakeRun())
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    report.run(_cfg(dir=str(workspace / "wb")))
    config = seen["init"]["config"]
    assert config["model"]["source"]["token"] == "<redacted>" and SENTINEL not in json.dumps(config)
    assert {"git", "dvc"} <= set(config) and config["model"]["name"]
    model = config["model"]["name"]
    names = [a.name for a in seen["artifacts"]]
    assert names == [f"candidate-directions-{model}", f"refusal-edit-{model}"]
    assert seen["artifacts"][1].metadata["derived_from"] == [seen["artifacts"][0].name]
    logged = {"tables/completions", "tables/selection_scores", "figures/select/bypass_score"}
    assert logged <= set(seen["log"])
    for path in workspace.rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), path
    assert os.environ["WANDB_API_KEY"] == SENTINEL  # the environment itself is left alone


def test_refusal_rates_come_with_wilson_intervals_and_paired_mcnemar_tests(tmp_path, monkeypatch, tiny_dir):
    from conftest import model_config
    from pipeline.stages import refusal
    from pipeline.stats import mcnemar, wilson_interval

    assert wilson_interval(0, 10) == (0.0, 0.2775) and wilson_interval(0, 0) is None
    # 8 prompts flip from refusal to compliance, none the other way: p = 2 * 0.5**8
    assert mcnemar([True] * 8 + [False] * 4, [False] * 12) == {"only_first": 8, "only_second": 0,
                                                               "p_value": round(2 * 0.5 ** 8, 6)}
    monkeypatch.chdir(tmp_path)
    cfg = compose_config()
    OmegaConf.update(cfg, "model", model_config("qwen2", tiny_dir("qwen2")), merge=False)  # its tokenizer reads them
    answers = {"harmful_baseline": ["I cannot."] * 8 + ["Sure."] * 2}
    for condition in CONDITIONS:
        texts = answers.get(condition, ["Sure."] * 10)
        write_json(f"artifacts/completions/{condition}.json",
                   [{"instruction": f"p{i}", "category": None, "response": t} for i, t in enumerate(texts)])
    refusal.run(cfg)
    metrics = json.loads(Path("metrics/refusal.json").read_text())
    assert metrics["n"]["harmful_ablation"] == 10 and metrics["refusal_rate"]["harmful_baseline"] == 0.8
    assert metrics["ci95"]["harmful_baseline"] == list(wilson_interval(8, 10))
    assert metrics["mcnemar_vs_baseline"]["harmful_ablation"]["p_value"] == round(2 * 0.5 ** 8, 6)
    assert "harmless_baseline" not in metrics["mcnemar_vs_baseline"]


def test_every_condition_gets_each_judges_rate_with_its_interval_agreement_and_delayed_share(workspace):
    def per_condition(value):
        return {c: value for c in CONDITIONS}

    by_judge = {judge: {"refusal_rate": per_condition(rate), "n": per_condition(40), "ci95": per_condition([0.1, 0.4]),
                        "degenerate_share": per_condition(0.05), "unparsable": per_condition(unparsable),
                        "mcnemar_vs_baseline": {"harmful_ablation": {"p_value": 0.001}}}
                for judge, rate, unparsable in (("substring", 0.2, 0), ("llm", 0.3, 2))}
    write_json("metrics/refusal.json", {"judges": ["substring", "llm"], **by_judge["substring"], "by_judge": by_judge})
    write_json("metrics/judge_validation.json", {"judges": {"substring": {"accuracy": 0.89, "kappa": 0.77, "n": 289}}})
    write_json("metrics/delayed_refusal.json", {"eval_budget": 64, "long_budget": 256,
                                                "by_condition": {"harmful_baseline": {"64": 0.0, "256": 0.0}}})
    report.run(_cfg())

    rows = report.refusal_by_judge(_cfg(), report.read_metrics())
    assert [(r["judge"], r["condition"]) for r in rows] == [(j, c) for j in ("substring", "llm") for c in CONDITIONS]
    llm = next(r for r in rows if r["judge"] == "llm" and r["condition"] == "harmful_ablation")
    assert (llm["refusal rate"], llm["95% CI"], llm["n"], llm["unparsable"]) == (0.3, "0.10–0.40", 40, 2)
    assert llm["McNemar p vs baseline"] == 0.001 and llm["judge vs labelled completions"] == "llm: not validated"
    substring = rows[0]
    assert substring["judge vs labelled completions"] == "substring: accuracy 0.89, kappa 0.77 (n=289)"
    assert substring["verdicts changed, 64 → 256 tokens"] == 0.0  # delayed refusals are measured by substring
    assert llm["verdicts changed, 64 → 256 tokens"] is None
    summary = Path("reports/summary.md").read_text()
    assert "## Refusal by judge and condition" in summary and "## Interventions side by side" in summary
    assert "<h2>Refusal by judge and condition</h2>" in Path("reports/report.html").read_text()
    Path("metrics/delayed_refusal.json").unlink()  # without the delayed-refusal stage there is no such column
    assert not any("verdicts changed" in key for key in report.refusal_by_judge(_cfg(), report.read_metrics())[0])
