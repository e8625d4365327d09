"""Weights & Biases logging that never breaks the pipeline.

One W&B run per pipeline run, written by the ``report`` stage from a ``RunRecord`` (config, summary,
tables, figures, artifacts). Mode: ``WANDB_MODE`` from the environment wins; otherwise
``tracking.wandb.mode``, where ``online`` falls back to ``offline`` when no API key is configured.
Offline runs are written to ``<dir>/wandb/offline-run-*`` (``dir`` = ``tracking.wandb.dir``, else
``WANDB_DIR``, else the working directory) and uploaded later with ``wandb sync``. Keys are read by
W&B from the environment and never copied into the run (see ``pipeline.provenance.redact``).

Any W&B failure is logged with its traceback and the stage carries on: tracking is never a reason to
lose a finished run.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from pipeline.provenance import redact

log = logging.getLogger(__name__)


@dataclass
class ArtifactSpec:
    """A W&B artifact: files plus metadata; ``inputs`` names artifacts of the same record it derives from."""

    name: str
    type: str
    files: list[Path]
    metadata: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)


@dataclass
class RunRecord:
    """Everything one pipeline run logs to W&B."""

    config: dict[str, Any]
    summary: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)
    artifacts: list[ArtifactSpec] = field(default_factory=list)


def resolve_mode(configured: str) -> str:
    mode = os.environ.get("WANDB_MODE") or configured
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning("tracking.wandb.mode=online but WANDB_API_KEY is not set; logging offline instead")
        return "offline"
    return mode


def run_name(cfg: DictConfig) -> str:
    """``tracking.wandb.name``, else model__data__direction__select__eval (plus the DVC experiment's name, if
    any), so runs of different direction methods on one model are told apart."""
    if cfg.tracking.wandb.get("name"):
        return cfg.tracking.wandb.name
    name = f"{cfg.model.name}__{cfg.data.name}__{cfg.direction.name}__{cfg.select.name}__{cfg.eval.name}"
    experiment = os.environ.get("DVC_EXP_NAME")
    return f"{name}__{experiment}" if experiment else name


def run_group(cfg: DictConfig) -> str:
    """``tracking.wandb.group``, else the data/select/eval combination (so a model sweep is one group)."""
    return cfg.tracking.wandb.group or f"{cfg.data.name}__{cfg.select.name}__{cfg.eval.name}"


def run_dir(cfg: DictConfig) -> Path:
    """Absolute directory W&B writes under (queued DVC experiments delete their own workspace)."""
    return Path(cfg.tracking.wandb.dir or os.environ.get("WANDB_DIR") or ".").expanduser().resolve()


def artifact_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)


def _log_artifacts(run, specs: list[ArtifactSpec], online: bool) -> None:
    """Log artifacts in order; online, each declares the artifacts it derives from as used (lineage).

    W&B records "use" edges only online (offline ``use_artifact`` raises), so the lineage is also kept
    in each artifact's metadata (``derived_from``), which survives ``wandb sync``.
    """
    import wandb

    logged: dict[str, Any] = {}
    for spec in specs:
        artifact = wandb.Artifact(spec.name, type=spec.type,
                                  metadata={**spec.metadata, "derived_from": list(spec.inputs)})
        for path in spec.files:
            artifact.add_file(str(path))
        if online:
            for name in spec.inputs:
                logged[name].wait()
                run.use_artifact(logged[name])
        logged[spec.name] = run.log_artifact(artifact)


def _log_record(run, record: RunRecord, online: bool) -> None:
    import wandb

    run.summary.update(record.summary)
    payload: dict[str, Any] = {f"tables/{k}": wandb.Table(dataframe=v) for k, v in record.tables.items()}
    payload.update({f"figures/{k}": wandb.Image(str(p)) for k, p in record.images.items()})
    run.log(payload)
    _log_artifacts(run, record.artifacts, online)


def log_run(cfg: DictConfig, record: RunRecord, job_type: str = "pipeline") -> Path | None:
    """Log ``record`` as one W&B run; return the run's local directory, or None (disabled or failed)."""
    mode = resolve_mode(cfg.tracking.wandb.mode)
    if mode == "disabled":
        log.info("W&B disabled (tracking.wandb.mode / WANDB_MODE)")
        return None
    try:
        import wandb

        directory = run_dir(cfg)
        directory.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=cfg.tracking.wandb.project,
            entity=cfg.tracking.wandb.entity,
            group=run_group(cfg),
            name=run_name(cfg),
            job_type=job_type,
            mode=mode,
            dir=str(directory),
            config=redact(record.config),
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
    except Exception:  # tracking must never fail the pipeline; the traceback goes to the log
        log.exception("W&B could not start; continuing without it")
        return None
    local = Path(run.dir).parent
    try:
        _log_record(run, record, online=mode == "online")
    except Exception:
        log.exception("W&B logging failed part-way; the run keeps what was logged, the pipeline outputs are "
                      "unaffected")
    try:
        run.finish()
    except Exception:
        log.exception("W&B could not finish the run; the pipeline outputs are unaffected")
        return None
    if mode == "offline":
        log.info("W&B run %s written offline to %s; upload with `wandb sync %s`", run.id, local, local)
    return local
