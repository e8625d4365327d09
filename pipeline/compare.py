"""Cross-model comparison of finished runs: one table and the paper's headline bar chart.

    python -m pipeline.compare runs/cpu                 # every finished job folder of a sweep
    python -m pipeline.compare --dvc-exps               # every DVC experiment (`dvc exp show`)
    python -m pipeline.compare runs/cpu --dvc-exps --out runs/comparison

A run is read from what every pipeline run leaves behind: ``params.yaml`` and ``metrics/*.json``
(for DVC experiments, the same files as ``dvc exp show --json`` reports them). The table has one
row per run: refusal rate on harmful prompts without and with directional ablation, on harmless
prompts without and with activation addition, the KL of the chosen direction on harmless prompts,
the CE-loss change under ablation, and the chosen layer (also as a fraction of depth) and
post-instruction position. It is written as ``comparison.csv`` and ``comparison.md``; the figure
(``refusal_rates.png``) shows, per model, the refusal rates the paper's Figure 1 and 3 show.
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

METRIC_FILES = ("select", "refusal", "loss")
# column -> (metrics file, key path inside it)
COLUMNS = {
    "refusal_harmful_baseline": ("refusal", "refusal_rate.harmful_baseline"),
    "refusal_harmful_ablation": ("refusal", "refusal_rate.harmful_ablation"),
    "refusal_harmless_baseline": ("refusal", "refusal_rate.harmless_baseline"),
    "refusal_harmless_addition": ("refusal", "refusal_rate.harmless_addition"),
    "kl_harmless_ablation": ("select", "kl"),
    "ce_delta_ablation_general": ("loss", "ce_loss.general_text.delta_ablation"),
    "ce_delta_ablation_completions": ("loss", "ce_loss.harmless_completions.delta_ablation"),
    "layer": ("select", "layer"),
    "layer_fraction": ("select", "layer_fraction"),
    "position": ("select", "position"),
}
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
                metrics = {m: json.loads((job / paths.metrics(m)).read_text()) for m in METRIC_FILES}
                runs.append(Run(str(job), params, metrics))
            else:
                log.warning("skipping %s: not finished", job)
    return runs


def runs_from_dvc_exp_show(records: list[dict]) -> list[Run]:
    """Runs from ``dvc exp show --json``: the workspace, each baseline commit and its experiments.

    Queued and running experiments are left out (a running one already shows its partial metrics);
    failed ones are listed as failed, without numbers.
    """
    runs = []

    def add(entry: dict, state: str | None = None) -> None:
        data = entry.get("data") or {}
        metrics = {
            m: (data.get("metrics") or {}).get(str(paths.metrics(m)), {}).get("data") for m in METRIC_FILES
        }
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        source = f"dvc:{entry.get('name') or data.get('rev') or entry.get('rev')}"
        if params and state == "failed":
            # no numbers: a failed experiment's metric files are its baseline's, not its own
            runs.append(Run(source, params, {}, "failed (dvc queue logs)"))
        elif params and state not in ("queued", "running") and all(metrics.values()):
            runs.append(Run(source, params, metrics))

    for record in records:
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


def table(runs: list[Run]) -> pd.DataFrame:
    rows = []
    for run in runs:
        row = {"model": run.params["model"]["name"], "data": run.params["data"]["name"], "run": run.source}
        row.update(
            {column: _get(run.metrics.get(stage, {}), key) for column, (stage, key) in COLUMNS.items()}
        )
        rows.append({**row, "status": run.status})
    return pd.DataFrame(rows, columns=["model", "data", *COLUMNS, "run", "status"])


def markdown(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return "–"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    header = [
        "model",
        "data",
        "refusal: harmful",
        "harmful + ablation",
        "harmless",
        "harmless + addition",
        "KL (ablation, harmless)",
        "ΔCE ablation (text)",
        "ΔCE ablation (completions)",
        "layer",
        "layer / depth",
        "position",
        "run",
        "status",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(cell(row[c]) for c in frame.columns) + " |")
    return "\n".join(lines) + "\n"


def labels(frame: pd.DataFrame) -> list[str]:
    """Model names, with the data set added where one model appears more than once."""
    dup = frame.model.duplicated(keep=False)
    return [
        f"{m}\n({d}, {i})" if is_dup else m
        for i, (m, d, is_dup) in enumerate(zip(frame.model, frame.data, dup, strict=True))
    ]


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


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path, help="sweep or job folders (e.g. runs/cpu)")
    parser.add_argument(
        "--dvc-exps", action="store_true", help="include every DVC experiment of this repository"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/comparison"), help="output folder")
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
    print(markdown(frame))
    print(f"wrote {args.out}/comparison.csv, comparison.md, refusal_rates.png ({len(frame)} runs)")


if __name__ == "__main__":
    main()
