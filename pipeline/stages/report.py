"""Stage ``report``: the run's numbers, plots and example completions, for people and for dashboards.

Every ``metrics/*.json`` is read and flattened to ``<stage>/<key>/...``, so a new stage's metrics
reach the report, the W&B summary and ``reports/summary.json`` without touching this file;
``report.headline`` (glob patterns over those keys) picks the curated table on top. Likewise every
PNG under ``plots/<stage>/`` becomes a figure and every ``artifacts/<stage>/verdicts.json`` (same
shape as the refusal stage's: ``{condition: [{instruction, response, <verdict fields>}]}``) adds verdict
columns to the completions. The interventions are compared side by side in one table (refusal on
harmful and harmless test prompts, first-token KL, CE-loss changes, over-refusal). Writes:

* ``reports/summary.{json,md}``, ``reports/report.html`` (self-contained) and ``reports/figures/``;
* ``plots/report/selection_scores.csv`` (long format: layer, position, metric, value) and
  ``plots/report/refusal_rate.csv``: the data of the DVC heatmap and bar plots;
* one W&B run (``pipeline.tracking``): config with provenance, summary, tables, figures, artifacts.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from pipeline import figures, paths, provenance
from pipeline.cli import run_stage
from pipeline.conditions import eval_conditions
from pipeline.edit import edit_files
from pipeline.io import atomic_path, read_json, sha256_file, write_json, write_text
from pipeline.render import Example, ReportContent, fmt, html_page, markdown
from pipeline.stages import STAGES
from pipeline.tracking import ArtifactSpec, RunRecord, artifact_name, log_run

log = logging.getLogger(__name__)

FIGURES = paths.REPORTS / "figures"
PLOT_DIR = paths.PLOTS / "report"
SCORE_METRICS = ("bypass_score", "induce_score", "kl", "cosmic_score")  # the selection scores any method writes
BASE_FIELDS = ("instruction", "category", "response")
TITLES = {"interventions": "Interventions side by side", "refusal_by_judge": "Refusal by judge and condition"}


def flatten(obj: Any, prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"<prefix>/a/b": 1}`` (dicts only; other values are leaves)."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.update(flatten(value, f"{prefix}/{key}"))
    return out


def _stage_order(stage: str) -> tuple[int, str]:
    return (STAGES.index(stage) if stage in STAGES else len(STAGES), stage)


def read_metrics(directory: Path = paths.METRICS) -> dict[str, Any]:
    """Every metrics file, flattened, in pipeline order (stages not in ``STAGES`` last, by name)."""
    flat: dict[str, Any] = {}
    for path in sorted(directory.glob("*.json"), key=lambda p: _stage_order(p.stem)):
        flat.update(flatten(read_json(path), path.stem))
    return flat


def pick(flat: dict[str, Any], patterns: list[str]) -> dict[str, Any]:
    """The keys matching each glob pattern, in pattern order, then file order."""
    out: dict[str, Any] = {}
    for pattern in patterns:
        out.update({k: v for k, v in flat.items() if fnmatch.fnmatchcase(k, pattern) and k not in out})
    return out


def timings() -> dict[str, float]:
    """Wall seconds of every stage that ran before this one, plus their total."""
    files = [p for p in (paths.ARTIFACTS / "timing").glob("*.json") if p.stem != "report"]
    files.sort(key=lambda p: _stage_order(p.stem))
    seconds = {p.stem: read_json(p)["wall_seconds"] for p in files}
    return {**seconds, "total": round(sum(seconds.values()), 2)}


def refusal_rates(flat: dict[str, Any]) -> pd.DataFrame:
    """``condition, rate`` from every ``<stage>/refusal_rate/<condition>`` (other judges are suffixed)."""
    rows = []
    for key, value in flat.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[1] == "refusal_rate" and isinstance(value, (int, float)):
            label = parts[2] if parts[0] == "refusal" else f"{parts[2]} ({parts[0]})"
            rows.append({"condition": label, "rate": float(value)})
    return pd.DataFrame(rows, columns=["condition", "rate"])


def selection_long(scores: pd.DataFrame, chosen: dict) -> pd.DataFrame:
    """Selection scores as (layer, position, metric, value) rows for the heatmap; NaN (not scored) dropped.
    The metrics are the scores the direction method wrote (dim and cone: bypass, induce, KL; cosmic: its own)."""
    metrics = [c for c in SCORE_METRICS if c in scores.columns]
    long = scores.melt(id_vars=["layer", "position", "position_label", "status"], value_vars=metrics,
                       var_name="metric").dropna(subset=["value"])
    long["chosen"] = (long.layer == chosen["layer"]) & (long.position == chosen["position"])
    return long[["layer", "position", "position_label", "metric", "value", "status", "chosen"]]


def verdict_table() -> pd.DataFrame:
    """Completions and every judge's verdicts (``<stage>/<field>`` columns), a row per condition, prompt."""
    files = sorted(paths.ARTIFACTS.glob("*/verdicts.json"), key=lambda p: _stage_order(p.parent.name))
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for path in files:
        judge = path.parent.name
        for condition, items in read_json(path).items():
            for item in items:
                row = rows.setdefault((condition, item["instruction"]),
                                      {"condition": condition, **{f: item.get(f) for f in BASE_FIELDS}})
                row.update({f"{judge}/{k}": v for k, v in item.items() if k not in BASE_FIELDS})
    return pd.DataFrame(list(rows.values()))


def _missing(value: Any) -> bool:
    """No verdict from this judge for this row (None, or NaN where pandas filled a gap)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def examples(table: pd.DataFrame, n: int, conditions: dict[str, tuple[str, str]]) -> dict[str, list[Example]]:
    """The first ``n`` test prompts of each side with their response under every condition of that side
    (``conditions``: ``{condition: (prompt set, intervention)}``)."""
    verdict_columns = [c for c in table.columns if "/" in c]
    out: dict[str, list[Example]] = {}
    for side in dict.fromkeys(s for s, _ in conditions.values()):
        names = [c for c, (s, _) in conditions.items() if s == side]
        rows = table[table.condition.isin(names)]
        title = f"{side} test prompts: " + " vs ".join(conditions[c][1] for c in names)
        out[title] = [
            Example(instruction, {
                r["condition"]: {"text": r["response"],
                                 "verdicts": {c: r[c] for c in verdict_columns if not _missing(r[c])}}
                for r in rows[rows.instruction == instruction].to_dict("records")
            })
            for instruction in rows.instruction.drop_duplicates()[:n]
        ]
    return out


def judge_agreement(flat: dict[str, Any], judge: str) -> str:
    """``judge: accuracy, kappa (n labelled)`` from the ``judge_validation`` stage, or that it was not validated."""
    found = f"judge_validation/judges/{judge}"
    if f"{found}/accuracy" not in flat:
        return f"{judge}: not validated"
    kappa = flat.get(f"{found}/kappa")
    return (f"{judge}: accuracy {flat[f'{found}/accuracy']:.2f}, kappa {'n/a' if kappa is None else f'{kappa:.2f}'} "
            f"(n={flat[f'{found}/n']})")


def interval_text(ci: list[float] | None) -> str | None:
    """A 95% interval as ``low–high`` (None where there is none)."""
    return f"{ci[0]:.2f}–{ci[1]:.2f}" if ci else None


def refusal_by_judge(cfg: DictConfig, flat: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per refusal judge and condition: the rate with its interval and n, the degenerate and
    unparsable counts, the paired test against the baseline, the judge's agreement with the labelled
    completions, and, where the ``delayed_refusal`` stage ran, the share of substring verdicts a longer
    generation changes."""
    budget = flat.get("delayed_refusal/eval_budget")
    delayed_column = f"verdicts changed, {budget} → {flat.get('delayed_refusal/long_budget')} tokens"
    conditions = eval_conditions(cfg.eval.conditions, cfg.eval.sets, cfg.eval.compared)
    rows = []
    for judge in flat.get("refusal/judges") or []:
        found = f"refusal/by_judge/{judge}"
        for condition in conditions:
            delayed = flat.get(f"delayed_refusal/by_condition/{condition}/{budget}") if judge == "substring" else None
            rows.append({
                "condition": condition,
                "judge": judge,
                "refusal rate": flat.get(f"{found}/refusal_rate/{condition}"),
                "95% CI": interval_text(flat.get(f"{found}/ci95/{condition}")),
                "n": flat.get(f"{found}/n/{condition}"),
                "degenerate": flat.get(f"{found}/degenerate_share/{condition}"),
                "unparsable": flat.get(f"{found}/unparsable/{condition}"),
                "McNemar p vs baseline": flat.get(f"{found}/mcnemar_vs_baseline/{condition}/p_value"),
                "judge vs labelled completions": judge_agreement(flat, judge),
                **({delayed_column: delayed} if budget is not None else {}),
            })
    return rows


def intervention_comparison(cfg: DictConfig, flat: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated intervention: what each evaluation stage measured for it (None where it did not)."""
    conditions = eval_conditions(cfg.eval.conditions, cfg.eval.sets, cfg.eval.compared)
    names = dict.fromkeys([*(iv for _, iv in conditions.values()), *cfg.eval.loss.interventions,
                           *cfg.eval.over_refusal.interventions, *cfg.eval.false_premise.interventions,
                           *cfg.eval.compared])

    def refusal(side: str, name: str, key: str = "refusal_rate/{}"):
        keys = [f"refusal/{key.format(c)}" for c, (s, iv) in conditions.items() if s == side and iv == name]
        return flat.get(keys[0]) if keys else None

    return [{
        "intervention": name,
        "refusal, harmful test": refusal("harmful", name),
        "refusal, harmless test": refusal("harmless", name),
        **{f"refusal, {prompt_set} (eval set)": refusal(prompt_set, name) for prompt_set in cfg.eval.sets},
        "first-token KL, harmless test": 0.0 if name == "baseline" else flat.get(f"loss/kl_harmless_test/{name}"),
        "ΔCE general text": flat.get(f"loss/ce_loss/general_text/delta_{name}"),
        "ΔCE own completions": flat.get(f"loss/ce_loss/harmless_completions/delta_{name}"),
        "over-refusal": flat.get(f"over_refusal/refusal_rate/{name}"),
        "harmful 95% CI": interval_text(refusal("harmful", name, "ci95/{}")),
        "McNemar p vs baseline (harmful)": refusal("harmful", name, "mcnemar_vs_baseline/{}/p_value"),
        "degenerate, harmful test": refusal("harmful", name, "degenerate_share/{}"),
        "accepts a false premise": flat.get(f"false_premise/by_intervention/{name}/false_premise/accepts_premise"),
        "takes a side on an opinion": flat.get(f"false_premise/by_intervention/{name}/opinion/takes_side"),
    } for name in names]


def collect_figures(rates: pd.DataFrame) -> dict[str, Path]:
    """Draw the refusal-rate chart; gather every stage's PNG plots; all copied under ``reports/figures``."""
    figures.refusal_bars(rates, FIGURES / "refusal_rate.png")
    found = {"refusal/refusal_rate": FIGURES / "refusal_rate.png"}
    for png in sorted(paths.PLOTS.glob("*/*.png"), key=lambda p: (_stage_order(p.parent.name), p.name)):
        if png.parent == PLOT_DIR:
            continue
        copy = FIGURES / f"{png.parent.name}__{png.name}"
        with atomic_path(copy) as tmp:
            shutil.copyfile(png, tmp)
        found[f"{png.parent.name}/{png.stem}"] = copy
    return found


def tables(verdicts: pd.DataFrame, chosen: dict, sections: dict[str, list[dict[str, Any]]]) -> dict[str, pd.DataFrame]:
    """The W&B tables: completions with verdicts, the report's tables (interventions side by side, refusal
    by judge), every candidate's scores, cosine curves, capabilities."""
    out = {"completions": verdicts, **{key: pd.DataFrame(rows) for key, rows in sections.items()}}
    scores = pd.read_csv(paths.stage_dir("select") / "scores.csv")
    out["selection_scores"] = scores.assign(chosen=(scores.layer == chosen["layer"])
                                            & (scores.position == chosen["position"]))
    curves = [pd.read_csv(p).melt(id_vars="layer", var_name="prompt_set", value_name="mean_cosine")
              .assign(view=p.stem.removeprefix("cosine_"))
              for p in sorted((paths.PLOTS / "projections").glob("cosine_*.csv"))]
    if curves:
        out["cosine_by_layer"] = pd.concat(curves, ignore_index=True)
    if (paths.stage_dir("search") / "trials.csv").exists():
        out["search_trials"] = pd.read_csv(paths.stage_dir("search") / "trials.csv")
    if paths.metrics("capabilities").exists():
        tasks = read_json(paths.metrics("capabilities"))["tasks"]
        out["capabilities"] = pd.DataFrame([{"task": task, "metric": metric, **values}
                                            for task, metrics in tasks.items() for metric, values in metrics.items()])
    return out


def direction_artifacts(model: str) -> list[ArtifactSpec]:
    """The candidate directions and, derived from them, the edit record (W&B lineage)."""
    candidates_dir = paths.stage_dir("directions")
    candidate_files = [candidates_dir / "candidates.safetensors", candidates_dir / "candidates.json"]
    direction_files = edit_files("select")
    info = read_json(candidates_dir / "candidates.json")
    candidates = ArtifactSpec(
        artifact_name(f"candidate-directions-{model}"), "candidate-directions", candidate_files,
        {"model": model, "positions": info["labels"], "n_layers": info["n_layers"],
         "d_model": info["d_model"], "sha256": {p.name: sha256_file(p) for p in candidate_files}},
    )
    direction = ArtifactSpec(
        artifact_name(f"refusal-edit-{model}"), "refusal-edit", direction_files,
        {**read_json(direction_files[1]),
         "sha256": {p.name: sha256_file(p) for p in direction_files}},
        inputs=[candidates.name],
    )
    return [candidates, direction]


def print_table(title: str, headline: dict[str, Any], seconds: dict[str, float]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in headline.items():
        table.add_row(key, fmt(value))
    table.add_row("total wall time (s)", f"{seconds['total']:.0f}")
    Console().print(table)


def run(cfg: DictConfig) -> None:
    flat = read_metrics()
    headline = pick(flat, list(cfg.report.headline))
    seconds = timings()
    chosen = read_json(edit_files("select")[1])
    rates = refusal_rates(flat)
    sections = {"interventions": intervention_comparison(cfg, flat), "refusal_by_judge": refusal_by_judge(cfg, flat)}
    verdicts = verdict_table()

    with atomic_path(PLOT_DIR / "selection_scores.csv") as tmp:
        selection_long(pd.read_csv(paths.stage_dir("select") / "scores.csv"), chosen).to_csv(tmp, index=False)
    with atomic_path(PLOT_DIR / "refusal_rate.csv") as tmp:
        rates.rename(columns={"rate": "refusal_rate"}).to_csv(tmp, index=False)
    found = collect_figures(rates)

    lock = provenance.read_lock()
    git = provenance.git_state(provenance.generated_paths(lock))
    config = {**OmegaConf.to_container(cfg, resolve=True), "git": git, "dvc": provenance.dvc_state()}
    summary = {**flat, **{f"seconds/{k}": v for k, v in seconds.items()}}
    record = RunRecord(config, summary, tables(verdicts, chosen, sections), found,
                       direction_artifacts(cfg.model.name))
    wandb_dir = log_run(cfg, record)

    title = f"Refusal direction: {cfg.model.name} on {cfg.data.name}"
    commit = (git["commit"] or "no commit")[:10] + (" (dirty)" if git["dirty"] else "")
    run_info = {"model": cfg.model.name, "data": cfg.data.name, "direction": cfg.direction.name,
                "select": cfg.select.name,
                "eval": cfg.eval.name, "git": commit, "W&B": str(wandb_dir) if wandb_dir else "not logged"}
    conditions = eval_conditions(cfg.eval.conditions, cfg.eval.sets, cfg.eval.compared)
    content = ReportContent(title, run_info, headline, flat, seconds, found,
                            examples(verdicts, cfg.report.n_examples, conditions),
                            {TITLES[key]: rows for key, rows in sections.items()})
    out = paths.REPORTS
    write_json(out / "summary.json", provenance.redact(
        {"run": run_info, "headline": headline, "metrics": flat, "wall_seconds": seconds}))
    write_text(out / "summary.md", markdown(content, FIGURES.name))
    write_text(out / "report.html", html_page(content))
    print_table(title, headline, seconds)
    log.info("report written to %s (open report.html in a browser)", out.resolve())


def main() -> None:
    run_stage("report", run)


if __name__ == "__main__":
    main()
