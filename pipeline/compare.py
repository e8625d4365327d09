"""Cross-model comparison of finished runs: one table and the paper's headline bar chart.

    python -m pipeline.compare runs/cpu                 # every finished job folder of a sweep
    python -m pipeline.compare --dvc-exps               # every DVC experiment (`dvc exp show`)
    python -m pipeline.compare runs/cpu --dvc-exps --out runs/comparison

    python -m pipeline.compare --dvc-exps --wandb       # ... and log table + figure as one W&B run

A run is read from what every pipeline run leaves behind: ``params.yaml`` and ``metrics/*.json``
(for DVC experiments, the same files as ``dvc exp show --json`` reports them). The table has one
row per run (model, data, direction method): refusal rate on harmful prompts without and with
directional ablation, on harmless prompts without and with activation addition, over-refusal on
borderline-safe prompts without and with ablation, the first-token KL of ablation on harmless
validation (where the method scored it) and test prompts, the CE-loss change under ablation, the
chosen layer (also as a fraction of depth) and post-instruction position, and the selection's wall
time. It is written as ``comparison.csv`` and ``comparison.md``; the figure (``refusal_rates.png``)
shows, per run, the refusal rates the paper's Figure 1 and 3 show. So ``direction=dim,cone,cosmic``
as a sweep or a DVC queue compares the methods on the same prompts in one table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from pipeline import paths  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.io import atomic_path, write_text  # noqa: E402

log = logging.getLogger(__name__)

METRIC_FILES = ("select", "refusal", "loss")  # a run without these three is not finished
OPTIONAL_METRIC_FILES = ("over_refusal",)     # shown where the run has them
# column -> (metrics file, key path inside it, header in comparison.md)
COLUMNS = {
    "refusal_harmful_baseline": ("refusal", "refusal_rate.harmful_baseline", "refusal: harmful"),
    "refusal_harmful_ablation": ("refusal", "refusal_rate.harmful_ablation", "harmful + ablation"),
    "refusal_harmless_baseline": ("refusal", "refusal_rate.harmless_baseline", "harmless"),
    "refusal_harmless_addition": ("refusal", "refusal_rate.harmless_addition", "harmless + addition"),
    "over_refusal_baseline": ("over_refusal", "refusal_rate.baseline", "over-refusal"),
    "over_refusal_ablation": ("over_refusal", "refusal_rate.ablation", "over-refusal + ablation"),
    "kl_harmless_ablation": ("select", "kl", "KL (ablation, harmless val)"),
    "kl_harmless_test_ablation": ("loss", "kl_harmless_test.ablation", "KL (ablation, harmless test)"),
    "ce_delta_ablation_general": ("loss", "ce_loss.general_text.delta_ablation", "ΔCE ablation (text)"),
    "ce_delta_ablation_completions": ("loss", "ce_loss.harmless_completions.delta_ablation",
                                      "ΔCE ablation (completions)"),
    "layer": ("select", "layer", "layer"),
    "layer_fraction": ("select", "layer_fraction", "layer / depth"),
    "position": ("select", "position", "position"),
    "selection_seconds": ("select", "selection_seconds", "selection (s)"),
}
IDENTITY = {"model": "model", "data": "data", "method": "direction method"}  # column -> header
BARS = {  # figure: (panel, label, column)
    "harmful_baseline": ("Harmful instructions", "no intervention", "refusal_harmful_baseline"),
    "harmful_ablation": ("Harmful instructions", "directional ablation", "refusal_harmful_ablation"),
    "harmless_baseline": ("Harmless instructions", "no intervention", "refusal_harmless_baseline"),
    "harmless_addition": ("Harmless instructions", "activation addition", "refusal_harmless_addition"),
}


@dataclass
class Run:
    """One finished pipeline run: where it came from, its params and its metrics by stage."""

    source: str
    params: dict
    metrics: dict[str, dict]
    status: str = "finished"


def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def runs_from_dirs(roots: Iterable[Path]) -> list[Run]:
    """Every run under ``roots`` (sweep or job folders): finished ones, and failed jobs with their reason."""
    runs = []
    for root in roots:
        for params_file in sorted(root.rglob("params.yaml")):
            job = params_file.parent
            params = yaml.safe_load(params_file.read_text())
            status = json.loads((job / "status.json").read_text()) if (job / "status.json").exists() else {}
            if status.get("status") == "failed":
                runs.append(Run(str(job), params, {}, f"failed in {status['stage']}: {status['error']}"))
            elif all((job / paths.metrics(m)).exists() for m in METRIC_FILES):
                metrics = {m: json.loads((job / paths.metrics(m)).read_text())
                           for m in METRIC_FILES + OPTIONAL_METRIC_FILES if (job / paths.metrics(m)).exists()}
                runs.append(Run(str(job), params, metrics))
            else:
                log.warning("skipping %s: not finished", job)
    return runs


def runs_from_dvc_exp_show(records: list[dict]) -> list[Run]:
    """Runs from ``dvc exp show --json``: the workspace and every commit's experiments.

    A commit's own entry is left out: its metric files are whatever was committed with it (in a repository
    that commits its metrics, every commit repeats its parent's run). Queued and running experiments are
    left out (a running one already shows its partial metrics); failed ones are listed as failed, without
    numbers.
    """
    runs = []

    def add(entry: dict, state: str | None = None) -> None:
        data = entry.get("data") or {}
        metrics = {m: (data.get("metrics") or {}).get(str(paths.metrics(m)), {}).get("data")
                   for m in METRIC_FILES + OPTIONAL_METRIC_FILES}
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        source = f"dvc:{entry.get('name') or data.get('rev') or entry.get('rev')}"
        if params and state == "failed":
            # no numbers: a failed experiment's metric files are its baseline's, not its own
            runs.append(Run(source, params, {}, "failed (dvc queue logs)"))
        elif params and state not in ("queued", "running") and all(metrics[m] for m in METRIC_FILES):
            runs.append(Run(source, params, {m: values for m, values in metrics.items() if values}))

    for record in records:
        if record.get("rev") == "workspace":
            add(record)
        for group in record.get("experiments") or []:
            for rev in group.get("revs") or []:
                add(rev, (group.get("executor") or {}).get("state"))
    return runs


def runs_from_dvc(repo: Path) -> list[Run]:
    result = subprocess.run(
        ["dvc", "exp", "show", "--json", "--all-commits"],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    if result.returncode != 0:
        raise PipelineError(
            f"dvc exp show failed: {result.stderr.strip()[-500:]}", "run it inside the DVC repository"
        )
    return runs_from_dvc_exp_show(json.loads(result.stdout))


def method(params: dict) -> str:
    """The direction method of a run's params (``dim`` for runs older than the registry), with a cone's k."""
    direction = params.get("direction") or {}
    name = direction.get("name", "dim")
    return f"{name} (k={direction['k']})" if "k" in direction else name


def table(runs: list[Run]) -> pd.DataFrame:
    rows = []
    for run in runs:
        row = {"model": run.params["model"]["name"], "data": run.params["data"]["name"], "method": method(run.params),
               "run": run.source}
        row.update(
            {column: _get(run.metrics.get(stage, {}), key) for column, (stage, key, _) in COLUMNS.items()}
        )
        rows.append({**row, "status": run.status})
    return pd.DataFrame(rows, columns=[*IDENTITY, *COLUMNS, "run", "status"])


def markdown(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return "–"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    header = [*IDENTITY.values(), *(label for _, _, label in COLUMNS.values()), "run", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(cell(row[c]) for c in frame.columns) + " |")
    return "\n".join(lines) + "\n"


def labels(frame: pd.DataFrame) -> list[str]:
    """Model names, with the data set and direction method added where one model appears more than once."""
    dup = frame.model.duplicated(keep=False)
    names = [f"{m}\n({d}, {k})" if is_dup else m
             for m, d, k, is_dup in zip(frame.model, frame.data, frame.method, dup, strict=True)]
    same = pd.Series(names).duplicated(keep=False)
    return [f"{name} #{i}" if is_same else name for i, (name, is_same) in enumerate(zip(names, same, strict=True))]


def bar_chart(frame: pd.DataFrame, out: Path) -> None:
    """The paper's headline figure: refusal rate per model, without vs with each intervention."""
    panels = list(dict.fromkeys(panel for panel, _, _ in BARS.values()))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(max(6.0, 1.6 * len(frame) * len(panels)), 4.2), sharey=True
    )
    names = labels(frame)
    for ax, panel in zip(axes, panels, strict=True):
        bars = [(label, column) for p, label, column in BARS.values() if p == panel]
        width = 0.8 / len(bars)
        for i, (label, column) in enumerate(bars):
            xs = [x + (i - (len(bars) - 1) / 2) * width for x in range(len(frame))]
            values = frame[column].astype(float).fillna(0.0)
            ax.bar(
                xs,
                values,
                width,
                label=label,
                color="#9e9e9e" if i == 0 else "#d62728" if "ablation" in label else "#1f77b4",
            )
        ax.set_xticks(range(len(frame)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(panel)
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("refusal rate (substring judge)")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def log_comparison(frame: pd.DataFrame, out: Path) -> Path | None:
    """The comparison as one W&B run (job type ``comparison``, named after the output folder), with the
    project's tracking settings from ``conf/``; W&B stays offline unless configured otherwise."""
    from pipeline.config import compose_config
    from pipeline.tracking import RunRecord, log_run

    cfg = compose_config([f"tracking.wandb.name=comparison-{out.name}", "tracking.wandb.group=comparison"])
    figure = out / "refusal_rates.png"
    record = RunRecord(config={"runs": list(frame.run)}, summary={"runs": len(frame)}, tables={"comparison": frame},
                       images={"refusal_rates": figure} if figure.exists() else {})
    return log_run(cfg, record, job_type="comparison")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path, help="sweep or job folders (e.g. runs/cpu)")
    parser.add_argument(
        "--dvc-exps", action="store_true", help="include every DVC experiment of this repository"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/comparison"), help="output folder")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the table and figure as one W&B run (the project's tracking.wandb settings)")
    args = parser.parse_args(argv)
    runs = runs_from_dirs(args.dirs) + (runs_from_dvc(Path.cwd()) if args.dvc_exps else [])
    if not runs:
        sys.exit("error: no finished runs found (give sweep folders such as runs/cpu, or --dvc-exps)")
    frame = table(runs)
    finished = frame[frame.status == "finished"].reset_index(drop=True)
    with atomic_path(args.out / "comparison.csv") as tmp:
        frame.to_csv(tmp, index=False)
    write_text(args.out / "comparison.md", markdown(frame))
    if not finished.empty:
        bar_chart(finished, args.out / "refusal_rates.png")
    if args.wandb:
        log_comparison(frame, args.out)
    print(markdown(frame))
    print(f"wrote {args.out}/comparison.csv, comparison.md, refusal_rates.png ({len(frame)} runs)")


if __name__ == "__main__":
    main()
