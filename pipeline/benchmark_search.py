"""Head to head: the project's ablation-parameter search against heretic, same model, prompts, trials and metrics.

``python -m pipeline.benchmark search --trials N [hydra overrides]`` runs, one after the other on this
machine, heretic (``heretic-llm`` 1.4.0, installed into its own virtualenv with the CPU torch pin and
run as an external program; none of its code is imported) and the project's search (``pipeline.search``)
with:

* the same fitting prompts (difference in means: the paper's harmful and harmless train splits) and the
  same evaluation prompts (their val splits), handed to heretic as local JSONL datasets;
* the same chat text: one system prompt given to both (heretic always sends one);
* the same trial budget, random start-up trials and seed, the same generation budget and batch size;
* the same refusal judge: the project's refusal phrases, given to heretic as its refusal markers (both
  match case-insensitively anywhere in the completion; heretic also counts an empty completion as a
  refusal and folds typographic apostrophes first);
* the same KL: exact KL(unedited || edited) of the first generated token's distribution, averaged over
  the harmless evaluation prompts;
* each tool in its fastest dtype: on a GPU both in ours (``model.dtype``), on a CPU heretic in float32
  (``default_heretic_dtype``); ``--heretic-dtype`` sets heretic's. In different dtypes each tool measures its KL
  against its own unedited model in its own dtype.

The project's search uses the direction sources of ``search.sources`` except ``selected`` (heretic has no
selected direction to offer): fractional-layer and per-layer directions, read at the last post-instruction
token, as heretic reads its directions.

It prints plain ``name: value`` lines: the settings (with the ``machine``: on a CPU whether it has AMX,
which decides how fast bfloat16 runs and so the rate ratio), each front's points, each front's hypervolume
against the reference point (every harmful evaluation prompt refused, KL = 1), ``hypervolume_ratio``
(ours / heretic), how many of each front's points the other front dominates, whether our front dominates
heretic's, and ``trials_per_hour_ratio`` (ours / heretic; each tool's rate over its trial phase, from the
trials' start and end times in its Optuna storage). ``--seeds 0 1 2`` runs both tools once per seed (our
side loads and fits once) and ends with ``seeds_*`` lines: in how many draws each claim held, since one
draw of two short searches says little about the next. Everything it writes stays under ``--work-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from pipeline import search
from pipeline.benchmark import emit, load_prompts
from pipeline.config import compose_config
from pipeline.edit import Edit
from pipeline.errors import ConfigError
from pipeline.models.loading import checkpoint, load_model, resolve_device, resolve_dtype
from pipeline.runtime import LOADED, apply_threads, machine, set_weight_first_rows
from pipeline.stages.activations import mean_activations

HERETIC = "heretic-llm==1.4.0"
TORCH_PIN = "torch==2.13.0"  # the CPU build; an unpinned torch would pull a multi-GB CUDA build
DEFAULT_VENV = Path("~/.cache/refusal-direction/benchmark/heretic-1.4.0").expanduser()
SYSTEM_PROMPT = "You are a helpful assistant."  # heretic's default; the project's chat format gets it too
EXIT_CHOICE = re.compile(r"\[(\d+)\]\s+Exit program")
# What heretic's trials store (its study is an Optuna journal file): raw objectives and trial times.
DUMP_TRIALS = """
import json, sys, optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
study = optuna.load_study(study_name="heretic", storage=JournalStorage(JournalFileBackend(sys.argv[1])))
print(json.dumps([{"number": t.number, "refusals": t.user_attrs["refusals"], "kl": t.user_attrs["kl_divergence"],
                   "base_refusals": t.user_attrs["base_refusals"], "start": t.datetime_start.timestamp(),
                   "end": t.datetime_complete.timestamp()}
                  for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]))
"""


@dataclass
class Run:
    """One tool's complete trials as ``(refusals, kl)`` points, how many trials it ran in all (ours prunes
    trials whose refusals cannot change the front), and its trial-phase and whole-run wall times."""

    tool: str
    points: list[tuple[int, float]]
    n_trials: int
    trial_seconds: float
    wall_seconds: float
    unedited_refusals: int

    @property
    def trials_per_hour(self) -> float:
        return self.n_trials * 3600 / self.trial_seconds

    def front(self) -> list[tuple[int, float]]:
        return sorted({self.points[i] for i in search.pareto(self.points)}, key=lambda p: (p[1], p[0]))


def heretic_executable(venv: Path) -> Path:
    """heretic's command in its own virtualenv, created (CPU torch pin first) when missing."""
    exe = venv / "bin" / "heretic"
    if exe.exists():
        return exe
    emit("heretic_install", f"{HERETIC} into {venv}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, HERETIC], check=True)
    return exe


def write_dataset(folder: Path, texts: list[str]) -> Path:
    """A local dataset heretic reads with ``load_dataset(folder, split="train")``, column ``text``."""
    folder.mkdir(parents=True)
    with (folder / "train.jsonl").open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return folder


def default_heretic_dtype(device: str, ours: str) -> str:
    """heretic's fastest dtype: on a CPU float32, since its batched bfloat16 products fall back from oneDNN
    (on a CPU with AMX a trial then takes minutes, against under a minute in float32; without AMX bfloat16
    is slower than float32 anyway); on a GPU the dtype our side loads."""
    return "float32" if device == "cpu" else ours


def device_description(device: str) -> str:
    """Where both tools ran: the trial-rate ratio depends on it (on a CPU, chiefly on whether it has AMX)."""
    return machine() if device == "cpu" else torch.cuda.get_device_name(device)


def heretic_command(exe: Path, model_dir: str, data: dict[str, Path], args: argparse.Namespace, seed: int,
                    dtype: str, device: str, markers: list[str], batch_size: int, checkpoints: Path) -> list[str]:
    sets = {"good-prompts": "harmless_train", "bad-prompts": "harmful_train",
            "good-evaluation-prompts": "harmless_val", "bad-evaluation-prompts": "harmful_val"}
    command = [str(exe), "--model", model_dir, "--dtypes", json.dumps([dtype]), "--device-map", device,
               "--n-trials", str(args.trials), "--n-startup-trials", str(args.startup_trials),
               "--seed", str(seed), "--max-response-length", str(args.max_new_tokens),
               "--batch-size", str(batch_size), "--refusal-markers", json.dumps(markers),
               "--system-prompt", SYSTEM_PROMPT, "--study-checkpoint-dir", str(checkpoints)]
    for option, key in sets.items():
        command += [f"--{option}.dataset", str(data[key]), f"--{option}.split", "train",
                    f"--{option}.column", "text"]
    return command


def run_heretic(command: list[str], log_path: Path) -> float:
    """Run heretic to the end of its study, answer its final menu with "Exit program", return the wall time.

    With ``KAGGLE_KERNEL_RUN_TYPE`` set heretic asks through numbered ``input()`` menus instead of a
    terminal UI, so the menu is answered on stdin once its "Exit program" line has been printed.
    """
    env = {**os.environ, "KAGGLE_KERNEL_RUN_TYPE": "benchmark", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with log_path.open("w") as log, subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                     stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if match := EXIT_CHOICE.search(line):
                proc.stdin.write(match.group(1) + "\n")
                proc.stdin.flush()
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"heretic exited with status {code}; its output is in {log_path}")
    return time.perf_counter() - start


def heretic_run(venv: Path, command: list[str], work: Path) -> Run:
    wall = run_heretic(command, work / "heretic.log")
    journal = next((work / "heretic").glob("*.jsonl"))
    dumped = subprocess.run([str(venv / "bin" / "python"), "-c", DUMP_TRIALS, str(journal)], check=True,
                            capture_output=True, text=True).stdout
    trials = json.loads(dumped)
    return Run("heretic", [(t["refusals"], t["kl"]) for t in trials], len(trials),
               max(t["end"] for t in trials) - min(t["start"] for t in trials), wall, trials[0]["base_refusals"])


@dataclass
class OurSide:
    """The project's search, fitted once on the benchmark's prompts; each seed then runs a fresh study."""

    objective: search.Objective
    unedited_refusals: int
    setup_seconds: float  # loading the model, fitting the directions and the unedited model's references
    batch_trials: int = 1  # trials asked and measured together (search.batch_trials)

    @classmethod
    def fit(cls, cfg, prompts: dict[str, list[str]], max_new_tokens: int) -> OurSide:
        start = time.perf_counter()
        lm = load_model(cfg.model, cfg.runtime.device)
        emit("ours_weight_first_rows", LOADED[cfg.model.name]["weight_first"]["rows"])
        batch = cfg.runtime.batch_size
        harmful_mean = mean_activations(lm, prompts["harmful_train"], batch, "harmful fit")[-1]
        harmless_mean = mean_activations(lm, prompts["harmless_train"], batch, "harmless fit")[-1]
        candidates = (harmful_mean - harmless_mean).float()  # [n_layers + 1, d] at the last post-instruction token
        middle = lm.n_layers // 2  # only the searched fractional-layer direction is used; `base` gives the site
        base = Edit.of(candidates[middle], middle, lm.n_layers, position=-1,
                       harmless_mean=harmless_mean[middle].float())
        harmless = search.HarmlessReference.of(lm, lm.encode(prompts["harmless_val"]), 1, cfg.eval.batch_size)
        objective = search.Objective(lm, base, candidates, prompts["harmful_val"], harmless,
                                     list(cfg.eval.refusal_substrings), max_new_tokens, cfg.eval.batch_size,
                                     tuple(cfg.search.variants), tuple(cfg.search.peak_range), benchmark_sources(cfg),
                                     harmless_mean.float(), tuple(cfg.search.layer_range), cfg.search.max_kl,
                                     cfg.search.prune_dominated)
        unedited = objective.refusals()
        emit("ours_batch_trials", cfg.search.batch_trials)
        return cls(objective, unedited, time.perf_counter() - start, cfg.search.batch_trials)

    def run(self, sampler: str, seed: int, args: argparse.Namespace, work: Path) -> Run:
        """One study with ``seed`` in a fresh SQLite file under ``work``."""
        start = time.perf_counter()
        study = optuna.create_study(storage=search.storage(f"sqlite:///{work / 'ours.db'}"), study_name="ours",
                                    directions=["minimize", "minimize"],
                                    sampler=search.sampler(sampler, seed, args.startup_trials))
        search.optimize(study, self.objective, args.trials, self.batch_trials)
        trials = search.finished(study)
        first, last = min(t.datetime_start for t in trials), max(t.datetime_complete for t in trials)
        return Run("ours", [(int(t.values[0]), t.values[1]) for t in search.completed(study)], len(trials),
                   (last - first).total_seconds(), self.setup_seconds + time.perf_counter() - start,
                   self.unedited_refusals)


def benchmark_sources(cfg) -> tuple[str, ...]:
    """``search.sources`` without ``selected``: heretic selects no direction, so neither side starts from one."""
    sources = tuple(s for s in cfg.search.sources if s != "selected")
    if not sources:
        raise ConfigError(f"search.sources={list(cfg.search.sources)} leaves the benchmark no direction source",
                          "add layer or per_layer, e.g. 'search.sources=[layer,per_layer]'")
    return sources


def covered(ours: list[tuple[int, float]], theirs: list[tuple[int, float]]) -> int:
    """How many points of ``theirs`` have one of ``ours`` with no more refusals and no more KL."""
    return sum(any(r <= tr and k <= tk for r, k in ours) for tr, tk in theirs)


def dominates(ours: list[tuple[int, float]], theirs: list[tuple[int, float]]) -> bool:
    """Every point of ``theirs`` has one of ``ours`` with no more refusals and no more KL."""
    return covered(ours, theirs) == len(theirs)


def report(runs: list[Run], n_harmful: int) -> None:
    reference = (n_harmful, 1.0)
    emit("hypervolume_reference", f"refusals={reference[0]} kl={reference[1]}")
    for run in runs:
        emit(f"{run.tool}_unedited_refusals", f"{run.unedited_refusals}/{n_harmful}")
        emit(f"{run.tool}_trials", f"{run.n_trials} ({run.n_trials - len(run.points)} pruned)")
        for refusals, kl in run.front():
            emit(f"{run.tool}_front_point", f"refusals={refusals} kl={kl:.4f}")
        emit(f"{run.tool}_hypervolume", f"{search.hypervolume(run.front(), reference):.4f}")
        emit(f"{run.tool}_trial_seconds", f"{run.trial_seconds:.0f}")
        emit(f"{run.tool}_setup_seconds", f"{run.wall_seconds - run.trial_seconds:.0f}")
        emit(f"{run.tool}_trials_per_hour", f"{run.trials_per_hour:.1f}")
    ours, heretic = (next(r for r in runs if r.tool == name) for name in ("ours", "heretic"))
    emit("hypervolume_ratio", f"{hypervolume_ratio(ours, heretic, reference):.3f}")
    emit("heretic_points_dominated_by_ours", f"{covered(ours.front(), heretic.front())}/{len(heretic.front())}")
    emit("ours_points_dominated_by_heretic", f"{covered(heretic.front(), ours.front())}/{len(ours.front())}")
    emit("ours_front_dominates_heretic_front", dominates(ours.front(), heretic.front()))
    emit("trials_per_hour_ratio", f"{ours.trials_per_hour / heretic.trials_per_hour:.2f}")


def report_seeds(pairs: list[tuple[Run, Run]], n_harmful: int) -> None:
    """How often, over the seeds' (heretic, ours) pairs, each claim held: one draw of two 20-trial searches
    says little about the next, so a claim is stated as how many draws it held in."""
    reference = (n_harmful, 1.0)
    heretics, ours = zip(*pairs)
    ratios = [hypervolume_ratio(o, h, reference) for h, o in pairs]
    emit("seeds_hypervolume_ratio", " ".join(f"{ratio:.3f}" for ratio in ratios))
    emit("seeds_hypervolume_ratio_at_least_1", f"{sum(ratio >= 1 for ratio in ratios)}/{len(pairs)}")
    emit("seeds_ours_front_dominates_heretic_front",
         f"{sum(dominates(o.front(), h.front()) for h, o in pairs)}/{len(pairs)}")
    emit("seeds_heretic_front_dominates_ours_front",
         f"{sum(dominates(h.front(), o.front()) for h, o in pairs)}/{len(pairs)}")
    emit("seeds_heretic_points_dominated_by_ours",
         f"{sum(covered(o.front(), h.front()) for h, o in pairs)}/{sum(len(h.front()) for h in heretics)}")
    emit("seeds_ours_points_dominated_by_heretic",
         f"{sum(covered(h.front(), o.front()) for h, o in pairs)}/{sum(len(o.front()) for o in ours)}")
    emit("seeds_trials_per_hour_ratio", f"{pooled_rate(ours) / pooled_rate(heretics):.2f}")


def hypervolume_ratio(ours: Run, heretic: Run, reference: tuple[float, float]) -> float:
    theirs = search.hypervolume(heretic.front(), reference)
    return search.hypervolume(ours.front(), reference) / theirs if theirs else float("inf")


def pooled_rate(runs: Sequence[Run]) -> float:
    """Trials per hour over several runs' trial phases together."""
    return sum(run.n_trials for run in runs) * 3600 / sum(run.trial_seconds for run in runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.benchmark search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--trials", type=int, default=20, help="trials per tool")
    parser.add_argument("--startup-trials", type=int, default=6, help="random trials before TPE, per tool")
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                        help="one run of each tool per seed; with several, each seed's lines follow a `seed:` line "
                             "and `seeds_*` lines say in how many draws each claim held")
    parser.add_argument("--n-fit", type=int, default=64, help="harmful and harmless fitting prompts each")
    parser.add_argument("--n-eval", type=int, default=24, help="harmful and harmless evaluation prompts each")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated to judge refusal")
    parser.add_argument("--heretic-dtype", choices=("bfloat16", "float16", "float32"),
                        help="heretic's dtype (default: float32 on a CPU, else the one our side loads)")
    parser.add_argument("--paper-dir", type=Path, default=Path("../shared/datasets/refusal_direction"))
    parser.add_argument("--heretic-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts/benchmark/search"))
    args = parser.parse_intermixed_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.startup_trials > args.trials:
        parser.error("--startup-trials must not exceed --trials")
    if len(set(args.seeds)) < len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed; give each seed once")

    cfg = compose_config([*args.overrides, "search=optuna", f"model.system_prompt={SYSTEM_PROMPT!r}"])
    apply_threads(cfg.runtime.threads)
    set_weight_first_rows(cfg.runtime.weight_first_rows)
    device = resolve_device(cfg.runtime.device)
    dtype = resolve_dtype(cfg.model, device)
    heretic_dtype = args.heretic_dtype or default_heretic_dtype(device, dtype)
    heretic_model_dir, _ = checkpoint(cfg.model, heretic_dtype)
    prompts = load_prompts(args.paper_dir if args.paper_dir.is_dir() else None, args.n_fit, args.n_eval)
    shutil.rmtree(args.work_dir, ignore_errors=True)  # a fresh study for each tool, every run
    data = {key: write_dataset(args.work_dir / "prompts" / key, texts) for key, texts in prompts.items()}
    markers = list(cfg.eval.refusal_substrings)
    exe = heretic_executable(args.heretic_venv)
    keys = ("sampler", "layer_range", "variants", "peak_range", "max_kl", "prune_dominated")
    ours_settings = {"sources": benchmark_sources(cfg), **{k: cfg.search[k] for k in keys}}
    for name, value in (("model", cfg.model.name), ("machine", device_description(device)), ("dtype", dtype),
                        ("heretic_dtype", heretic_dtype), ("heretic_model_dir", heretic_model_dir),
                        ("trials", args.trials), ("startup_trials", args.startup_trials),
                        ("seeds", " ".join(map(str, args.seeds))),
                        ("max_new_tokens", args.max_new_tokens), ("batch_size", cfg.eval.batch_size),
                        ("ours_settings", json.dumps(ours_settings, default=list)),
                        ("prompts_per_set", {k: len(v) for k, v in prompts.items()}),
                        ("refusal_markers", json.dumps(markers))):
        emit(name, value)
    ours = OurSide.fit(cfg, prompts, args.max_new_tokens)
    pairs = []
    for seed in args.seeds:
        work = args.work_dir / f"seed-{seed}"
        work.mkdir(parents=True)
        command = heretic_command(exe, heretic_model_dir, data, args, seed, heretic_dtype, device, markers,
                                  cfg.eval.batch_size, work / "heretic")
        emit("seed", seed)
        emit("heretic_settings", " ".join(command[1:]))
        pair = (heretic_run(args.heretic_venv, command, work), ours.run(cfg.search.sampler, seed, args, work))
        report(list(pair), len(prompts["harmful_val"]))
        pairs.append(pair)
    if len(pairs) > 1:
        report_seeds(pairs, len(prompts["harmful_val"]))

if __name__ == "__main__":
    main()
