"""Saved W&B views to compare pipeline runs side by side: a workspace and a report, made by one command.

    python -m pipeline.wandb_views [--entity E] [--project P] [--group G] [--what workspace report]

Online only (it saves the views through the W&B API; ``WANDB_API_KEY`` must be set): offline runs
are uploaded first with ``wandb sync <dir>/wandb/offline-run-*``. Entity, project and the headline
metrics default to ``params.yaml`` (``tracking.wandb``, ``report.headline``); the metric keys are
the summary keys of the project's runs, so a stage added later shows up once its runs are logged.

Both views hold the same panels: one bar chart per headline metric (a bar per run), a parallel
coordinates plot from the config (model, layer) to the headline metrics, a run comparer (config
diff), the figures (heatmaps, refusal-rate bars, cosine curves), the logged tables (completions with
verdicts, selection scores, cosine by layer, capabilities) and the wall time per stage.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.config import load_params


def matching(keys: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Keys matching each glob pattern, in pattern order, without repeats."""
    out: list[str] = []
    for pattern in patterns:
        out += [k for k in keys if fnmatch.fnmatchcase(k, pattern) and k not in out]
    return out


def panels(keys: Sequence[str], headline: Sequence[str]) -> dict[str, list[Any]]:
    """Panels by section name, from the available summary ``keys`` and the ``headline`` patterns."""
    import wandb_workspaces.reports.v2 as wr

    metrics = matching(keys, headline)
    seconds = [wr.SummaryMetric(k) for k in matching(keys, ["seconds/*"])]
    return {
        "Headline": [wr.BarPlot(title=k, metrics=[wr.SummaryMetric(k)], orientation="h") for k in metrics],
        "Settings vs results": [
            wr.ParallelCoordinatesPlot(columns=[
                wr.ParallelCoordinatesPlotColumn(metric=m)
                for m in [wr.Config("model.name"), wr.Config("select.name"), *map(wr.SummaryMetric, metrics)]
            ]),
            wr.RunComparer(diff_only="split"),
        ],
        "Figures": [wr.MediaBrowser(title="figures", media_keys=matching(keys, ["figures/*"]))],
        "Tables": [wr.WeavePanelSummaryTable(table_name=k) for k in matching(keys, ["tables/*"])],
        "Wall time": [wr.BarPlot(title="seconds per stage", metrics=seconds)],
    }


def _filters(group: str | None):
    import wandb_workspaces.workspaces as ws

    return ws.And(ws.Metric("Group") == group) if group else ""


def build_workspace(entity: str, project: str, keys: Sequence[str], headline: Sequence[str],
                    group: str | None = None):
    import wandb_workspaces.workspaces as ws

    return ws.Workspace(
        entity=entity, project=project, name=f"Refusal direction: {group or 'all runs'}",
        sections=[ws.Section(name=name, panels=items, is_open=True)
                  for name, items in panels(keys, headline).items()],
        runset_settings=ws.RunsetSettings(filters=_filters(group)),
    )


def build_report(entity: str, project: str, keys: Sequence[str], headline: Sequence[str],
                 group: str | None = None):
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(entity=entity, project=project, name=group or "all runs", filters=_filters(group))
    blocks: list[Any] = [
        wr.H1(f"Refusal direction: {group or 'all runs'}"),
        wr.P("One run per pipeline run (model, data, settings). Config: the resolved params, git commit and "
             "DVC stage hashes. Offline runs appear after `wandb sync <dir>/wandb/offline-run-*`."),
    ]
    for name, items in panels(keys, headline).items():
        blocks += [wr.H2(name), wr.PanelGrid(runsets=[runset], panels=items)]
    return wr.Report(entity=entity, project=project, title=f"Refusal direction: {group or 'all runs'}",
                     description="Comparison of refusal-direction pipeline runs", blocks=blocks)


def summary_keys(entity: str, project: str, group: str | None) -> list[str]:
    """Every summary key of the project's runs (in the group, if given), first-seen order (needs network)."""
    import wandb

    runs = wandb.Api().runs(f"{entity}/{project}", filters={"group": group} if group else None)
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(k for k in run.summary.keys() if not k.startswith("_")))
    return list(keys)


def main(argv: Sequence[str] | None = None) -> None:
    params = load_params()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entity", default=params.tracking.wandb.entity)
    parser.add_argument("--project", default=params.tracking.wandb.project)
    parser.add_argument("--group", default=params.tracking.wandb.group, help="only this group (a sweep)")
    parser.add_argument("--what", nargs="+", choices=["workspace", "report"], default=["workspace", "report"])
    args = parser.parse_args(argv)
    if not args.entity:
        sys.exit("error: no W&B entity: pass --entity or set tracking.wandb.entity")
    keys = summary_keys(args.entity, args.project, args.group)
    if not keys:
        sys.exit(f"error: no runs in {args.entity}/{args.project}: `wandb sync` offline runs first")
    headline = list(params.report.headline)
    builders = {"workspace": build_workspace, "report": build_report}
    for what in args.what:
        view = builders[what](args.entity, args.project, keys, headline, args.group)
        view.save()
        print(f"saved {what}: {view.url}")


if __name__ == "__main__":
    main()
