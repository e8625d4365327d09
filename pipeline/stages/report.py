"""Stage ``report``: one summary of the run, as JSON, Markdown, a console table and a W&B run."""

from __future__ import annotations

import html
import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.io import read_json, write_json, write_text
from pipeline.stages import STAGES
from pipeline.stages.completions import CONDITIONS
from pipeline.tracking import wandb_run

log = logging.getLogger(__name__)


def collect(cfg: DictConfig) -> dict:
    """Headline numbers of the run, flat and JSON-ready."""
    select, judge, loss = (read_json(paths.metrics(s)) for s in ("select", "judge", "loss"))
    ortho = read_json(paths.metrics("orthogonalize"))
    rates = judge["refusal_rate"]
    summary = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "refusal_harmful_baseline": rates["harmful_baseline"],
        "refusal_harmful_ablation": rates["harmful_ablation"],
        "refusal_harmful_subtraction": rates["harmful_subtraction"],
        "refusal_harmless_baseline": rates["harmless_baseline"],
        "refusal_harmless_addition": rates["harmless_addition"],
        "layer": select["layer"],
        "layer_fraction": select["layer_fraction"],
        "position": select["position"],
        "selection_kl": select["kl"],
        "selection_bypass_score": select["bypass_score"],
        "selection_induce_score": select["induce_score"],
        "orthogonalize_mean_kl": ortho.get("mean_kl_vs_hooks"),
    }
    for corpus, values in loss["ce_loss"].items():
        for key in ("ce_baseline", "delta_ablation", "delta_subtraction"):
            summary[f"{corpus}_{key}"] = values.get(key)
    return summary


def timings() -> dict[str, float]:
    out = {}
    for stage in STAGES:
        path = paths.timing(stage)
        if path.exists():
            out[stage] = read_json(path)["wall_seconds"]
    return out


def examples(n: int) -> dict[str, list[dict]]:
    return {c: read_json(paths.completions(c))[:n] for c in CONDITIONS}


def _cell(text: str) -> str:
    """Escape model output for a Markdown table cell (no HTML, no table breaks)."""
    return html.escape(text).replace("|", "&#124;").replace("\n", "<br>").replace("`", "&#96;")


def markdown(summary: dict, seconds: dict[str, float], samples: dict[str, list[dict]]) -> str:
    lines = [f"# Refusal direction: {summary['model']} on {summary['data']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in seconds.items()]
    lines += ["", "## Example completions", ""]
    for condition, items in samples.items():
        lines += [f"### {condition}", "", "| instruction | response |", "|---|---|"]
        lines += [f"| {_cell(i['instruction'])} | {_cell(i['response'])} |" for i in items]
        lines.append("")
    return "\n".join(lines) + "\n"


def print_table(summary: dict, seconds: dict[str, float]) -> None:
    table = Table(title=f"Refusal direction: {summary['model']} / {summary['data']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    table.add_row("total wall time (s)", f"{sum(seconds.values()):.0f}")
    Console().print(table)


def log_wandb(cfg: DictConfig, summary: dict, seconds: dict[str, float]) -> None:
    with wandb_run(cfg) as run:
        if run is None:
            return
        import wandb

        run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        run.summary.update({f"seconds/{k}": v for k, v in seconds.items()})
        scores = pd.read_csv(paths.stage_dir("select") / "scores.csv")
        tables = {"selection_scores": wandb.Table(dataframe=scores)}
        rows = [[c, i["instruction"], i["response"], i["refusal"]]
                for c, items in read_json(paths.stage_dir("judge") / "verdicts.json").items() for i in items]
        tables["completions"] = wandb.Table(columns=["condition", "instruction", "response", "refusal"], data=rows)
        images = {f"select/{p.stem}": wandb.Image(str(p)) for p in sorted((paths.PLOTS / "select").glob("*.png"))}
        run.log({**tables, **images})


def run(cfg: DictConfig) -> None:
    summary = collect(cfg)
    seconds = timings()
    out = paths.REPORTS
    write_json(out / "summary.json", {"summary": summary, "wall_seconds": seconds})
    write_text(out / "summary.md", markdown(summary, seconds, examples(cfg.report.n_examples)))
    print_table(summary, seconds)
    log_wandb(cfg, summary, seconds)
    log.info("report written to %s", Path(out).resolve())


def main() -> None:
    run_stage("report", run)


if __name__ == "__main__":
    main()
