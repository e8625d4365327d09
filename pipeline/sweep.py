"""Hydra app: run the whole pipeline once per configuration, each job in a folder of its own.

    python -m pipeline.sweep -m model=smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct
    python -m pipeline.sweep -m +sweep=paper13 hydra/launcher=slurm

``conf/sweep_job.yaml`` is ``conf/config.yaml`` plus where jobs run: ``runs/<sweep.name>/<job>/`` with
``<job> = <model>__<data>`` and, when other keys are overridden on the command line, those overrides
appended, so two jobs of a sweep never share a folder. Inside it a job writes the same relative paths
as ``dvc repro`` does in the repository (``params.yaml``, ``artifacts/``, ``metrics/``, ``plots/``,
``reports/``), by calling each stage's ``run(cfg)`` in ``dvc.yaml``'s order.

Re-running a job reuses what it already computed: after each stage the job stamps a fingerprint of
what ``dvc.yaml`` says the stage depends on (its params keys, the content of its code and data
deps, and the fingerprints of the stages whose outputs it reads). A stage whose stamp matches and
whose outputs exist is skipped: re-running a sweep after changing an evaluation setting in its sweep
config (or in ``conf/``) re-runs completions and what follows, never the activations. A failed job
leaves ``status.json`` saying which stage failed and why. Launchers (``hydra/launcher=parallel`` for
joblib, ``slurm`` for a cluster) only change where jobs run.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import hydra
import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipeline.cli import timed
from pipeline.config import CONF_DIR, PARAMS_FILE, dvc_stages, load_params, render_params, stage_params
from pipeline.errors import ConfigError, PipelineError
from pipeline.io import write_json, write_text
from pipeline.runtime import WORKERS_ENV
from pipeline.stages import STAGES

log = logging.getLogger(__name__)

ROOT = CONF_DIR.parent
STAMPS = Path(".stamps")
STATUS = Path("status.json")
# Config keys holding paths; relative ones are taken from where the sweep was launched, not the job folder.
PATH_KEYS = {"path", "mirror", "dir"}
MAX_OVERRIDES_CHARS = 80  # longer override lists are shortened to a prefix + hash (file names have limits)


def job_dir(model: str, data: str, overrides: str) -> str:
    """``<model>__<data>[__<other overrides>]``: unique per job of a sweep (Hydra resolver ``job_dir``).

    The full overrides are in the job's ``.hydra/overrides.yaml``.
    """
    if len(overrides) > MAX_OVERRIDES_CHARS:
        overrides = (
            f"{overrides[: MAX_OVERRIDES_CHARS - 9]}~{hashlib.sha256(overrides.encode()).hexdigest()[:8]}"
        )
    return f"{model}__{data}__{overrides}" if overrides else f"{model}__{data}"


OmegaConf.register_new_resolver("job_dir", job_dir, replace=True)


def _outputs(spec: dict) -> list[str]:
    entries = [*spec.get("outs", []), *spec.get("metrics", [])]
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def _producers(dep: str) -> list[str]:
    """The stages with a declared output that contains, is, or lies inside ``dep`` (``metrics`` has many)."""
    return [stage for stage, spec in dvc_stages().items()
            if any(dep == out or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep.rstrip("/") + "/")
                   for out in _outputs(spec))]


def _content_hash(path: Path) -> str:
    files = (
        sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        if path.is_dir()
        else [path]
    )
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def fingerprint(stage: str, cfg: DictConfig, upstream: dict[str, str]) -> str:
    """What the stage's result depends on per ``dvc.yaml``: params keys, code and data, upstream results."""
    spec = dvc_stages()[stage]
    params = stage_params(stage, cfg)
    code, inputs = {}, {}
    for dep in spec.get("deps", []):
        dep = re.sub(r"\$\{([^}]+)\}", lambda m: str(OmegaConf.select(cfg, m.group(1))), dep)  # dvc.yaml templating
        producers = _producers(dep)
        if not producers:
            code[dep] = _content_hash(ROOT / dep)
        for producer in producers:
            inputs[producer] = upstream[producer]
    blob = json.dumps(
        {"stage": stage, "params": params, "code": code, "inputs": inputs}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def up_to_date(stage: str, stage_print: str) -> bool:
    """The stage ran here with this fingerprint and its outputs are still there."""
    stamp = STAMPS / f"{stage}.sha256"
    outputs = _outputs(dvc_stages()[stage])
    return stamp.exists() and stamp.read_text() == stage_print and all(Path(o).exists() for o in outputs)


def run_stages(cfg: DictConfig, stages: Iterable[str] = STAGES) -> dict[str, str]:
    """Run (or reuse) each stage in the current folder; returns ``{stage: "ran" | "reused"}``."""
    done: dict[str, str] = {}
    prints: dict[str, str] = {}
    for stage in stages:
        prints[stage] = fingerprint(stage, cfg, prints)
        stamp = STAMPS / f"{stage}.sha256"
        if up_to_date(stage, prints[stage]):
            log.info("stage %s: outputs up to date, reused", stage)
            done[stage] = "reused"
            continue
        stamp.unlink(missing_ok=True)
        try:
            timed(stage, importlib.import_module(f"pipeline.stages.{stage}").run, cfg)
        except PipelineError as error:
            write_json(
                STATUS,
                {
                    "status": "failed",
                    "stage": stage,
                    "error": error.problem,
                    "fix": error.fix,
                    "stages": done,
                },
            )
            raise
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        write_text(stamp, prints[stage])
        done[stage] = "ran"
    write_json(STATUS, {"status": "finished", "stages": done})
    return done


def _absolute_paths(node, base: Path):
    """Copy of a config container with relative values of ``PATH_KEYS`` made absolute against ``base``."""
    if isinstance(node, dict):
        return {
            k: str(base / v)
            if k in PATH_KEYS and isinstance(v, str) and not Path(v).expanduser().is_absolute()
            else _absolute_paths(v, base)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_absolute_paths(v, base) for v in node]
    return node


def job_params(cfg: DictConfig, launch_dir: Path) -> str:
    """The job's ``params.yaml``: the composed config without the sweep's own settings."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("sweep", None)
    return render_params(OmegaConf.create(_absolute_paths(container, launch_dir)))


@hydra.main(config_path=str(CONF_DIR), config_name="sweep_job", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, str]:
    """One job: write ``params.yaml`` here (Hydra has chdir'd into the job folder), then run the stages."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n_jobs = HydraConfig.get().launcher.get("n_jobs")
    if isinstance(n_jobs, int) and n_jobs > 1:  # jobs sharing this machine's cores: runtime.threads=auto divides them
        os.environ.setdefault(WORKERS_ENV, str(n_jobs))
    launch_dir = Path(hydra.utils.get_original_cwd())
    lock = FileLock(".job.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout as error:
        raise ConfigError(
            f"another job is running in {Path.cwd()}", "wait for it, or give this sweep another sweep.name"
        ) from error
    try:
        write_text(PARAMS_FILE, job_params(cfg, launch_dir))
        result = run_stages(load_params(PARAMS_FILE))
    finally:
        lock.release()
    log.info("job %s: %s", Path.cwd().name, result)
    return result


if __name__ == "__main__":
    # Run the function of the importable module, not of ``__main__``: parallel launchers (joblib, submitit)
    # pickle the job function and its helpers by module name for their worker processes.
    from pipeline.sweep import main as importable_main

    importable_main()
