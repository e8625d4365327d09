"""Weights & Biases logging that never breaks the pipeline.

Mode: ``WANDB_MODE`` from the environment wins; otherwise ``tracking.wandb.mode`` from config, where
``online`` falls back to ``offline`` when no API key is configured. Offline runs are written under
``tracking.wandb.dir`` (default ``./wandb``) and uploaded later with ``wandb sync``. Keys are read by
W&B from the environment and never copied into the run config. Any W&B failure is logged with its
traceback and the stage carries on: tracking is never a reason to lose a finished run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def resolve_mode(configured: str) -> str:
    mode = os.environ.get("WANDB_MODE") or configured
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning("tracking.wandb.mode=online but WANDB_API_KEY is not set; logging offline instead")
        return "offline"
    return mode


def run_name(cfg: DictConfig) -> str:
    return f"{cfg.model.name}__{cfg.data.name}__{cfg.select.name}__{cfg.eval.name}"


@contextlib.contextmanager
def wandb_run(cfg: DictConfig, job_type: str = "pipeline") -> Iterator[Any]:
    """Yield a W&B run (or None if disabled or if W&B failed to start)."""
    settings = cfg.tracking.wandb
    mode = resolve_mode(settings.mode)
    if mode == "disabled":
        yield None
        return
    run = None
    try:
        import wandb

        directory = Path(settings.dir or "wandb").expanduser().resolve()
        directory.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group or f"{cfg.data.name}__{cfg.select.name}__{cfg.eval.name}",
            name=run_name(cfg),
            job_type=job_type,
            mode=mode,
            dir=str(directory),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )
    except Exception:  # tracking must never fail the pipeline; the traceback goes to the log
        log.exception("W&B could not start; continuing without it")
    try:
        yield run
    finally:
        if run is not None:
            try:
                run.finish()
                log.info("W&B run %s written (%s mode) under %s", run.id, mode, run.dir)
            except Exception:
                log.exception("W&B could not finish the run; the pipeline outputs are unaffected")
