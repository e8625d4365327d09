"""Stage ``search``: an Optuna multi-objective search over ablation parameters (opt-in: ``search=optuna``).

The study (``pipeline.search``) minimises refusals on the filtered harmful validation prompts and
KL (first token by default, ``search.kl_tokens``) on the filtered harmless validation prompts; the
fitting prompts (train) and the test prompts the evaluation stages report on are never used. Trials are
stored in ``search.storage`` (by default ``artifacts/search/study.db``, SQLite, kept across runs: a
killed stage resumes the same study);
with a PostgreSQL or MySQL URL, workers started with ``python -m pipeline.search_worker`` join it.

Writes every trial (``trials.csv``), the Pareto front (``pareto.csv``, ``plots/search/pareto.png``
with the unedited model and the selected direction's full ablation marked), the chosen trial
(``search.choose``: fewest refusals with KL at most ``kl_budget``) as an edit record
(``artifacts/search/edit.*``) that the evaluation stages read with ``eval.edit=search``, and the
front's hypervolume in ``metrics/search.json``. With ``search=none`` (the default) it only writes
``{"enabled": false}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pipeline import paths, search  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.edit import edit_files, load_edit, save_edit  # noqa: E402
from pipeline.errors import ConfigError, PipelineError  # noqa: E402
from pipeline.io import atomic_path, load_tensors, sha256_file, write_json  # noqa: E402
from pipeline.models.loading import LoadedModel, load_model  # noqa: E402
from pipeline.stages.common import instructions, read_split  # noqa: E402

log = logging.getLogger(__name__)

OUT = paths.stage_dir("search")
PLOT_DIR = paths.PLOTS / "search"
DATABASE = "study.db"
MEANS = paths.stage_dir("activations") / "means.safetensors"


def storage_url(configured: str | None) -> str:
    """``search.storage``, or the SQLite file kept in ``artifacts/search`` (absolute, so workers agree)."""
    return configured or f"sqlite:///{(OUT / DATABASE).resolve()}"


def study_name(cfg: DictConfig) -> str:
    """A name for this exact search: model, search settings, and the inputs it reads (a change starts a new study)."""
    settings = OmegaConf.to_container(cfg.search, resolve=True)
    for key in ("storage", "study_name", "n_trials", "kl_budget", "batch_trials"):  # same trials asked: same study
        settings.pop(key, None)
    inputs = [*edit_files("select"), paths.stage_dir("directions") / "candidates.safetensors", MEANS,
              *(paths.split_file("filter", side, "val") for side in ("harmful", "harmless"))]
    blob = json.dumps({"model": cfg.model.name, "search": settings, "eval": list(cfg.eval.refusal_substrings),
                       "inputs": [sha256_file(p) for p in inputs]}, sort_keys=True)
    return cfg.search.study_name or f"{cfg.model.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def objective(cfg: DictConfig, lm: LoadedModel) -> search.Objective:
    """The study's objective on the filtered validation prompts, with the unedited harmless logits computed once."""
    edit = load_edit(lm, "select")
    site = edit.position + lm.chat.n_post_instruction  # the edit's position as an index into the stored tensors
    candidates = load_tensors(paths.stage_dir("directions") / "candidates.safetensors")["directions"][site]
    harmless_means = load_tensors(MEANS)["harmless_mean"][site]
    harmful = instructions(read_split("filter", "harmful", "val"))[: cfg.search.n_harmful]
    harmless_ids = lm.encode(instructions(read_split("filter", "harmless", "val"))[: cfg.search.n_harmless])
    variants = list(cfg.search.variants)
    if set(variants) - set(search.VARIANTS) or not variants:
        raise ConfigError(f"search.variants={variants}", f"choose from: {', '.join(search.VARIANTS)}")
    unfoldable = [v for v in variants if search.VARIANTS[v] == "norm_preserving_ablation"]
    if lm.adapter.orthogonalization_blocker() and unfoldable:
        log.warning("%s cannot fold weight edits: the search leaves out %s", lm.name, ", ".join(unfoldable))
        variants = [v for v in variants if v not in unfoldable]
        if not variants:
            raise ConfigError(f"search.variants={list(cfg.search.variants)} on {lm.name}",
                              "add plain or projected: this model's weight edits cannot be folded")
    unknown = set(cfg.search.sources) - set(search.SOURCES)
    if unknown or not cfg.search.sources:
        raise ConfigError(f"search.sources={list(cfg.search.sources)}", f"choose from: {', '.join(search.SOURCES)}")
    harmless = search.HarmlessReference.of(lm, harmless_ids, cfg.search.kl_tokens, cfg.eval.batch_size)
    return search.Objective(lm, edit, candidates, harmful, harmless, list(cfg.eval.refusal_substrings),
                            cfg.search.max_new_tokens, cfg.eval.batch_size, tuple(variants),
                            tuple(cfg.search.peak_range), tuple(cfg.search.sources), harmless_means,
                            tuple(cfg.search.layer_range), cfg.search.max_kl, cfg.search.prune_dominated)


def open_study(cfg: DictConfig) -> optuna.Study:
    if cfg.search.sampler not in search.SAMPLERS:
        raise ConfigError(f"search.sampler={cfg.search.sampler!r}", f"use one of: {', '.join(search.SAMPLERS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name=study_name(cfg), storage=search.storage(storage_url(cfg.search.storage)), load_if_exists=True,
        directions=["minimize", "minimize"],
        sampler=search.sampler(cfg.search.sampler, cfg.search.seed, cfg.search.startup_trials),
    )


def trial_table(trials: list[optuna.trial.FrozenTrial]) -> pd.DataFrame:
    rows = [{"trial": t.number, "refusals": t.values[0], "kl": t.values[1], "seconds": t.user_attrs.get("seconds"),
             **search.used_params(t)} for t in trials]
    table = pd.DataFrame(rows)
    front = search.pareto(list(zip(table.refusals, table.kl)))
    table["pareto"] = table.index.isin(front)
    return table


def plot_front(table: pd.DataFrame, marks: dict[str, tuple[float, float]], chosen: int, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(table.kl, table.refusals, s=14, color="0.7", label="trial")
    front = table[table.pareto].sort_values("kl")
    ax.step(front.kl, front.refusals, where="post", color="tab:blue", marker="o", ms=4, label="Pareto front")
    for (label, (refusals, kl)), marker in zip(marks.items(), ("s", "D")):
        ax.scatter([kl], [refusals], marker=marker, s=50, color="tab:red", zorder=3, label=label)
    row = table[table.trial == chosen].iloc[0]
    ax.scatter([row.kl], [row.refusals], marker="*", s=160, color="gold", edgecolor="black", zorder=4,
               label="chosen trial")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("first-token KL on harmless prompts (vs unedited)")
    ax.set_ylabel("refusals on harmful prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def disabled() -> None:
    """Say the search is off; keep an earlier study's database (DVC persists the folder), drop its results."""
    shutil.rmtree(PLOT_DIR, ignore_errors=True)
    PLOT_DIR.mkdir(parents=True)
    OUT.mkdir(parents=True, exist_ok=True)
    for path in OUT.iterdir():
        if path.name != DATABASE:
            path.unlink()
    write_json(paths.metrics("search"), {"enabled": False})
    log.info("stage search skipped: the search is off (enable it with `dvc exp run -S search=optuna`)")


def work(cfg: DictConfig) -> tuple[optuna.Study, search.Objective, int]:
    """Join (or start) the study and run trials until it holds ``search.n_trials`` complete ones: what every
    worker does (``python -m pipeline.search_worker``), and the stage before writing its outputs."""
    if not cfg.search.enabled:
        raise ConfigError("the search is off", "run it with search=optuna")
    study = open_study(cfg)
    lm = load_model(cfg.model, cfg.runtime.device)
    goal = objective(cfg, lm)
    if not study.trials and "selected" in goal.sources and goal.peak_range[0] <= 1 <= goal.peak_range[1]:
        study.enqueue_trial(search.paper_params(lm.n_layers))  # start from the paper's edit
    return study, goal, search.optimize(study, goal, cfg.search.n_trials, cfg.search.batch_trials)


def run(cfg: DictConfig) -> None:
    if not cfg.search.enabled:
        disabled()
        return
    study, goal, ran = work(cfg)
    trials = search.completed(study)
    n_finished = len(search.finished(study))
    if not trials:
        raise PipelineError(f"all {n_finished} trials of study {study.study_name} were pruned for a KL above "
                            f"search.max_kl={cfg.search.max_kl} (they stay in the study)",
                            "raise search.max_kl or lower search.peak_range and rerun (that starts a new study)")
    table = trial_table(trials)
    with atomic_path(OUT / "trials.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(OUT / "pareto.csv") as tmp:
        table[table.pareto].sort_values("kl").to_csv(tmp, index=False)
    with atomic_path(PLOT_DIR / "trials.csv") as tmp:  # the DVC scatter plot's data
        table[["trial", "kl", "refusals", "pareto"]].to_csv(tmp, index=False)

    chosen, within = search.choose(trials, cfg.search.kl_budget)
    params = search.used_params(chosen)
    edit, intervention = search.trial_edit(params, goal.base, goal.candidates, goal.harmless_means)
    save_edit(OUT, replace(edit, provenance={
        "method": "search", "stage": "search", "model": cfg.model.name, "intervention": intervention,
        "trial": chosen.number, "params": params, "study": study.study_name,
        "derived_from": "artifacts/select/edit.safetensors"}))
    baseline = (goal.refusals(), 0.0)  # the unedited model: its KL to itself is 0 by definition
    selected = goal.measure(goal.base, "ablation")[:2]  # the paper's: the selected direction at every layer
    plot_front(table, {"unedited model": baseline, "selected direction, full ablation": selected}, chosen.number,
               PLOT_DIR / "pareto.png")
    reference = (len(goal.harmful), 1.0)
    front = table[table.pareto]
    write_json(paths.metrics("search"), {
        "enabled": True, "study": study.study_name, "n_trials": n_finished, "n_pruned": n_finished - len(trials),
        "trials_this_run": ran,
        "n_harmful": len(goal.harmful), "n_harmless": len(goal.harmless.ids), "kl_tokens": cfg.search.kl_tokens,
        "chosen": {"trial": chosen.number, "refusals": chosen.values[0], "kl": round(chosen.values[1], 6),
                   "within_kl_budget": within, "intervention": intervention},
        "unedited": {"refusals": baseline[0]},
        "selected_full_ablation": {"refusals": selected[0], "kl": round(selected[1], 6)},
        "pareto_size": int(len(front)),
        "hypervolume": round(search.hypervolume(list(zip(front.refusals, front.kl)), reference), 6),
        "hypervolume_reference": {"refusals": reference[0], "kl": reference[1]},
    })
    log.info("search: %d trials (%d this run); chosen trial %d: %d refusals, KL %.4f", n_finished, ran,
             chosen.number, chosen.values[0], chosen.values[1])


def main() -> None:
    run_stage("search", run)


if __name__ == "__main__":
    main()
