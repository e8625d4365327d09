"""The thin entry point every DVC stage goes through.

``python -m pipeline.stages.<name> [key=value ...]`` loads ``params.yaml`` (with overrides),
sets torch's threads (``runtime.threads``; warns when the machine is already busy) and how its models
multiply a few rows (``runtime.weight_first_rows``), runs the stage, records its wall time (and how
each model computed: dtype, weight-first rows) next to its outputs, and turns a ``PipelineError``
into a short message and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

from omegaconf import DictConfig
from rich.console import Console
from rich.logging import RichHandler

from pipeline import paths
from pipeline.config import load_params
from pipeline.errors import PipelineError
from pipeline.inference import OOM_BACKOFFS
from pipeline.io import write_json
from pipeline.runtime import LOADED, apply_threads, set_weight_first_rows, warn_if_oversubscribed

console = Console(stderr=True)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def timed(name: str, fn: Callable[[DictConfig], None], cfg: DictConfig) -> float:
    """Run stage ``fn`` on ``cfg`` and record its wall time, its threads, how each model it loaded computes
    (dtype, weight-first rows) and any OOM batch back-offs next to its outputs."""
    threads = apply_threads(cfg.runtime.threads)
    set_weight_first_rows(cfg.runtime.weight_first_rows)
    warn_if_oversubscribed()
    start = time.perf_counter()
    OOM_BACKOFFS.clear()  # stages of a sweep job share one process: count this stage's back-offs only
    LOADED.clear()
    fn(cfg)
    seconds = time.perf_counter() - start
    write_json(paths.timing(name), {"stage": name, "wall_seconds": round(seconds, 2), "threads": threads,
                                    "models": LOADED, "oom_backoffs": OOM_BACKOFFS})
    logging.getLogger(name).info("stage %s finished in %.1f s", name, seconds)
    return seconds


def run_stage(name: str, fn: Callable[[DictConfig], None]) -> None:
    """Run stage ``fn`` as a program: see the module docstring."""
    setup_logging()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        timed(name, fn, load_params(overrides=sys.argv[1:]))
    except PipelineError as error:
        console.print(f"[bold red]error in stage {name}:[/] {error}")
        sys.exit(2)
