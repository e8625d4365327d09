"""Stage ``capabilities``: lm-eval benchmarks of the original model against the orthogonalized one.

Every task in ``eval.capabilities.tasks`` runs through lm-eval (``simple_evaluate`` on an in-memory
``HFLM``) for two model variants: ``original`` and ``orthogonalized``. The orthogonalized variant is
the edited model the ``orthogonalize`` stage saved, or, for families where the weight edit is not
exact (or with ``edited_model: hooks``), the original under ``orthogonalize.intervention`` (hooks, or
weights edited in place) with the ``select`` stage's edit record. Task names
resolve against the project's offline tasks (``pipeline/data/lm_eval_tasks``: small multiple-choice
and generation tasks over shipped data) and, for any other name, lm-eval's own registry (the paper's
mmlu, arc_challenge, gsm8k, truthfulqa_mc2, winogrande, tinyHellaswag; those download from the hub).

Each (variant, task) result is lm-eval's results JSON, written to
``artifacts/capabilities/<variant>/<task>.json`` as soon as it finishes; the headline numbers per task
(original, orthogonalized, delta) become ``metrics/capabilities.json``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import paths
from pipeline.checkpoint import Checkpoint
from pipeline.cli import run_stage
from pipeline.edit import edit_files, load_edit
from pipeline.errors import ConfigError
from pipeline.interventions import apply, folded_name
from pipeline.io import write_json, write_text
from pipeline.models.loading import LoadedModel, load_model

log = logging.getLogger(__name__)

VARIANTS = ("original", "orthogonalized")
EDITED_MODELS = ("auto", "saved", "hooks")
LOCAL_TASKS = Path(str(resources.files("pipeline.data") / "lm_eval_tasks"))
TASK_DATA_PREFIX = "pipeline/data/lm_eval_tasks"  # how the shipped task YAMLs name their data files


@contextlib.contextmanager
def offline_tasks() -> Iterator[Path]:
    """The offline task YAMLs, with their data files as absolute paths, in a folder for the block.

    The shipped YAMLs name their data relative to the project root (readable as written); a stage may
    run elsewhere (a sweep job runs in its own folder), so lm-eval gets copies pointing at the files.
    """
    with tempfile.TemporaryDirectory(prefix="lm_eval_tasks_") as tmp:
        for spec in LOCAL_TASKS.glob("*.yaml"):
            text = spec.read_text().replace(f"{TASK_DATA_PREFIX}/", f"{LOCAL_TASKS.as_posix()}/")
            (Path(tmp) / spec.name).write_text(text)
        yield Path(tmp)


def task_manager(tasks: list[str], include: Path):
    """lm-eval's task index: the offline tasks (in ``include``) alone if they cover ``tasks`` (faster),
    else lm-eval's registry too."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=str(include), include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    manager = TaskManager(include_path=str(include))
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ConfigError(f"lm-eval knows no task(s) {missing}",
                          "fix eval.capabilities.tasks (names as `lm-eval ls tasks` prints them, or the "
                          "offline tasks in pipeline/data/lm_eval_tasks)")
    return manager


def edited_model_mode(requested: str) -> str:
    """``saved`` if the orthogonalize stage saved an edited model (and it is wanted), else ``hooks``."""
    if requested not in EDITED_MODELS:
        raise ConfigError(f"eval.capabilities.edited_model={requested!r}", f"use one of {EDITED_MODELS}")
    saved = (paths.stage_dir("orthogonalized_model") / "config.json").exists()
    if requested == "saved" and not saved:
        raise ConfigError("eval.capabilities.edited_model=saved but artifacts/orthogonalized_model holds no "
                          "saved model", "set orthogonalize.save_model=true, or edited_model=hooks")
    if requested == "auto":
        return "saved" if saved else "hooks"
    return requested


@contextlib.contextmanager
def variant(cfg: DictConfig, name: str, mode: str) -> Iterator[LoadedModel]:
    """The model of one variant (with its hooks, if any) for the duration of the block."""
    model_cfg = cfg.model
    if name == "orthogonalized" and mode == "saved":
        spec = OmegaConf.to_container(cfg.model)
        spec["name"] = f"{cfg.model.name}-orthogonalized"
        spec["source"] = {"type": "local", "path": str(paths.stage_dir("orthogonalized_model"))}
        model_cfg = OmegaConf.create(spec)
    lm = load_model(model_cfg, cfg.runtime.device)
    if name == "orthogonalized" and mode == "hooks":
        edit = load_edit(lm, cfg.eval.edit)
        with apply(lm, folded_name(cfg.orthogonalize.intervention, edit.provenance), edit):
            yield lm
    else:
        yield lm


def headline(results: dict, task: str) -> dict[str, float]:
    """The task's metrics without standard errors: ``acc,none`` -> ``acc``, ``em,strict`` -> ``em_strict``."""
    out = {}
    for key, value in results["results"][task].items():
        metric, _, filt = key.partition(",")
        if filt and "_stderr" not in metric and isinstance(value, (int, float)):
            out[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
    return out


def result_path(name: str, task: str) -> Path:
    return paths.stage_dir("capabilities") / name / f"{task}.json"


def evaluate_variant(cfg: DictConfig, name: str, mode: str, manager, store: Checkpoint) -> dict[str, dict[str, float]]:
    """Run every task on one variant, writing lm-eval's results JSON per task as soon as it finishes.

    Each task's results also go to ``store``, so an interrupted stage resumes at the next (variant,
    task). Returns the headline metrics per task; the model is released when this returns.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    cap = cfg.eval.capabilities
    scores = {}
    with variant(cfg, name, mode) as lm:
        hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=cap.batch_size)
        for task in cap.tasks:
            results = store.get(task)
            if results is None:
                start = time.perf_counter()
                # no request cache (use_cache): its key cannot see the ablation hooks
                results = simple_evaluate(
                    model=hflm, tasks=[task], task_manager=manager, num_fewshot=cap.num_fewshot, limit=cap.limit,
                    log_samples=bool(cap.log_samples), apply_chat_template=bool(cap.apply_chat_template),
                )
                results["wall_seconds"] = round(time.perf_counter() - start, 2)
                results = json.loads(json.dumps(results, default=handle_non_serializable))
                store.put(task, results)
            else:
                log.info("%s / %s: restored from checkpoint", name, task)
            write_text(result_path(name, task), json.dumps(results, indent=2, ensure_ascii=False) + "\n")
            scores[task] = headline(results, task)
            log.info("%s / %s: %s (%.0f s)", name, task, scores[task], results["wall_seconds"])
    return scores


def run(cfg: DictConfig) -> None:
    cap = cfg.eval.capabilities
    mode = edited_model_mode(cap.edited_model)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    scores = {}
    # the saved edited model is a function of the config and the edit record, so these fingerprint it
    checkpoint = Checkpoint.open("capabilities", cfg, edit_files(cfg.eval.edit))
    with offline_tasks() as include:
        manager = task_manager(list(cap.tasks), include)
        for name in VARIANTS:
            scores[name] = evaluate_variant(cfg, name, mode, manager, checkpoint.scope(name))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    tasks = {}
    for task in cap.tasks:
        original, edited = scores["original"][task], scores["orthogonalized"][task]
        tasks[task] = {m: {"original": original[m], "orthogonalized": edited[m],
                           "delta": round(edited[m] - original[m], 5)} for m in original}
    write_json(paths.metrics("capabilities"), {"edited_model": mode, "tasks": tasks})
    checkpoint.clear()
    log.info("capabilities: %s", tasks)


def main() -> None:
    run_stage("capabilities", run)


if __name__ == "__main__":
    main()
