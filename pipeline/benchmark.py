"""Performance benchmark: the project's selection and generation against plain references, side by side.

``python -m pipeline.benchmark`` (or ``make benchmark``) prints one ``name: value`` line per figure:

1. selection: a plain reference of the paper's procedure (one full forward pass per candidate per
   condition, full logits, fixed padded batches, every candidate scored) against the project's
   (shared-prefix KV cache, last-position logits only, length-bucketed batches, stacked candidates,
   filter-order pruning); same chosen (position, layer), score agreement, speed ratio;
2. the matmul rate per dtype (bfloat16, float32) as this CPU runs it and under oneDNN ISA caps that mimic
   CPUs without AMX (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``, ``AVX2``), the dtype ``model.dtype=auto``
   chose, and the model FLOP utilisation of the project's forward passes against that dtype's rate;
3. batched greedy generation against a one-prompt-at-a-time loop (tokens/s), and with every
   ``nn.Linear`` computing as ``F.linear`` against weight-first (``runtime.weight_first_rows``);
4. peak memory of the activations stage for two train-set sizes;
5. wall time per stage of the last default ``dvc repro`` (from artifacts/timing).

``python -m pipeline.benchmark search --trials N`` is the search's head-to-head against heretic
(``pipeline.benchmark_search``).

Prompts: the paper's splits (n_train 128, n_val 32, seed 42) when a mirror is found (``--paper-dir``,
default ``../shared/datasets/refusal_direction``), else the offline default data.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline import paths
from pipeline.config import compose_config
from pipeline.data_sources import load_source
from pipeline.edit import Edit
from pipeline.inference import left_pad
from pipeline.interventions import apply
from pipeline.models.loading import LoadedModel, load_model, use_weight_first
from pipeline.refusal import kl_divergence, refusal_scores
from pipeline.runtime import BF16_MARGIN, LOADED, rates_under_isa, set_weight_first_rows
from pipeline.selection import Halving, Rules, Scores, choose, score_candidates, score_table
from pipeline.stages import STAGES
from pipeline.stages.activations import mean_activations
from pipeline.stages.data import split_pool

# How far the project's scores may sit from the reference's: both run in the model's dtype, and
# bfloat16 sums grouped differently (prefix cache, stacked rows, batch shapes) differ in the last bits.
# Refusal scores are log-odds; KL is in nats.
SCORE_TOLERANCE = {"bypass_score": 0.05, "induce_score": 0.05, "kl": 0.01}
SECTIONS = ("dtypes", "selection", "utilisation", "generation", "weight_first", "memory", "stages")


def emit(name: str, value) -> None:
    print(f"{name}: {value}", flush=True)


def load_prompts(paper_dir: Path | None, n_train: int, n_val: int) -> dict[str, list[str]]:
    """Train/val instructions per side, the paper's way (``random.seed(42)``; sample) when its sets exist."""
    if paper_dir is not None and (paper_dir / "splits").is_dir():
        emit("prompts", f"paper splits from {paper_dir}")
        random.seed(42)
        out = {}
        for split, n in (("train", n_train), ("val", n_val)):  # the paper's sampling order
            for side in ("harmful", "harmless"):
                rows = json.loads((paper_dir / "splits" / f"{side}_{split}.json").read_text())
                out[f"{side}_{split}"] = random.sample([r["instruction"] for r in rows], n)
        return out
    emit("prompts", "offline default data (no paper mirror found)")
    cfg = compose_config()
    out = {}
    for side in ("harmful", "harmless"):
        records = load_source(cfg.data[side].pool, cfg.data)
        splits = split_pool(records, cfg.data[side].sizes, cfg.data.seed, side)
        for split in ("train", "val"):
            out[f"{side}_{split}"] = [r["instruction"] for r in splits[split]]
    return out


def filter_by_refusal(lm: LoadedModel, prompts: dict[str, list[str]], batch_size: int) -> dict[str, list[str]]:
    """The paper's filter, applied once to the inputs both implementations share."""
    runner = lm.runner(batch_size, progress=False)
    out = {}
    for key, texts in prompts.items():
        scores = refusal_scores(runner.last_logits(lm.encode(texts), lm.chat.prefix_ids), lm.refusal_ids)
        keep = scores > 0 if key.startswith("harmful") else scores < 0
        out[key] = [t for t, k in zip(texts, keep) if k]
        emit(f"filtered_{key}", f"{len(out[key])}/{len(texts)}")
        if not out[key]:
            sys.exit(f"error: no {key} prompt survives the refusal filter for {lm.name}; pass --no-filter")
    return out


@torch.inference_mode()
def reference_last_logits(lm: LoadedModel, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """The paper's forward: fixed batches, left padding, full logits for every position, last one kept."""
    ids = lm.encode(texts)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.eos_ids[0]
    out = []
    for i in range(0, len(ids), batch_size):
        input_ids, mask = left_pad(ids[i : i + batch_size], pad)
        out.append(lm.model(input_ids=input_ids, attention_mask=mask).logits[:, -1].float())
    return torch.cat(out)


def reference_selection(lm: LoadedModel, candidates: torch.Tensor, harmful: list[str], harmless: list[str],
                        rules: Rules) -> tuple[dict, tuple[int, int]]:
    """Every candidate (the paper's n_pos x n_layers), three full forward passes each, then the filters."""
    n_pos = candidates.shape[0]
    base_harmless = reference_last_logits(lm, harmless)
    scores = {}
    for p in range(n_pos):
        for l in range(lm.n_layers):
            edit = Edit.of(candidates[p, l], l, lm.n_layers)
            with apply(lm, "ablation", edit):
                kl = float(kl_divergence(base_harmless, reference_last_logits(lm, harmless)).mean())
                bypass = float(refusal_scores(reference_last_logits(lm, harmful), lm.refusal_ids).mean())
            with apply(lm, "addition", edit):
                induce = float(refusal_scores(reference_last_logits(lm, harmless), lm.refusal_ids).mean())
            scores[(p, l)] = {"bypass_score": bypass, "induce_score": induce, "kl": kl}
    eligible = [(s["bypass_score"], p, l) for (p, l), s in scores.items()
                if rules.rejection(l, lm.n_layers, s["induce_score"], s["kl"], s["bypass_score"],
                                   float(candidates[p, l].norm())) is None]
    _, p, l = min(eligible)
    return scores, (p, l)


def bench_selection(lm: LoadedModel, prompts: dict[str, list[str]], cfg, skip_reference: bool) -> None:
    """The configured scoring (halving by default) against rules-first scoring, whose choice is exactly the
    exhaustive one (tested), then rules-first against a plain reference that scores everything."""
    harmful_train, harmless_train = prompts["harmful_train"], prompts["harmless_train"]
    candidates = (mean_activations(lm, harmful_train, cfg.runtime.batch_size, "harmful train")
                  - mean_activations(lm, harmless_train, cfg.runtime.batch_size, "harmless train")).float()
    rules = Rules.from_config(cfg.select)
    harmful, harmless = prompts["harmful_val"], prompts["harmless_val"]
    emit("selection_candidates", f"{candidates.shape[0]} positions x {candidates.shape[1]} sites")
    emit("selection_val_prompts", f"harmful {len(harmful)}, harmless {len(harmless)}")

    def run(scoring: str) -> tuple[Scores, tuple[int, int], float]:
        start = time.perf_counter()
        scores = score_candidates(lm, candidates, harmful, harmless, rules, scoring, cfg.runtime.batch_size,
                                  cfg.select.candidates_per_pass, halving=Halving(**cfg.select.halving))
        seconds = time.perf_counter() - start
        chosen = choose(score_table(scores, rules, lm.n_layers, lm.chat.post_instruction_labels(),
                                    candidates.norm(dim=-1)))
        emit(f"selection_{scoring}_seconds", f"{seconds:.1f}")
        emit(f"selection_{scoring}_choice", f"position {int(chosen.position)}, layer {int(chosen.layer)}")
        emit(f"selection_{scoring}_prompt_passes", scores.prompt_passes)
        return scores, (int(chosen.position) + candidates.shape[0], int(chosen.layer)), seconds

    ours, ours_choice, ours_seconds = run("rules_first")
    if cfg.select.scoring != "rules_first":
        fast, fast_choice, fast_seconds = run(cfg.select.scoring)
        emit(f"selection_{cfg.select.scoring}_same_choice_as_exhaustive", fast_choice == ours_choice)
        emit(f"selection_{cfg.select.scoring}_work_saved",
             f"{1 - fast.prompt_passes / ours.prompt_passes:.1%} of rules_first's prompt passes, "
             f"{ours_seconds / fast_seconds:.2f}x faster")
    if skip_reference:
        return

    start = time.perf_counter()
    ref_scores, ref_choice = reference_selection(lm, candidates, harmful, harmless, rules)
    ref_seconds = time.perf_counter() - start
    emit("selection_reference_seconds", f"{ref_seconds:.1f}")
    emit("selection_reference_choice",
         f"position {ref_choice[0] - candidates.shape[0]}, layer {ref_choice[1]}")
    emit("selection_same_choice", ref_choice == ours_choice)
    agree = True
    for metric in ("bypass_score", "induce_score", "kl"):
        grid = getattr(ours, metric)
        diffs = [abs(float(grid[p, l]) - s[metric]) for (p, l), s in ref_scores.items() if not grid[p, l].isnan()]
        emit(f"selection_max_abs_diff_{metric}", f"{max(diffs):.4g} over {len(diffs)} candidates")
        agree &= max(diffs) <= SCORE_TOLERANCE[metric]
    emit("selection_scores_within_tolerance", f"{agree} ({SCORE_TOLERANCE})")
    emit("selection_speedup", f"{ref_seconds / ours_seconds:.2f}x")


def matmul_rate(dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Best matmul rate (TFLOP/s) in ``dtype`` over a few shapes typical of a transformer block."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (4096, 1536, 8960), (1024, 4096, 4096)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            count += 1
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start) / 1e12)
    return best


def forward_flops(lm: LoadedModel, tokens: int, attended: int) -> float:
    """Matmul FLOPs of a forward pass: weights (embedding lookup excluded) plus attention scores."""
    weights = sum(p.numel() for name, p in lm.model.named_parameters()
                  if p.dim() == 2 and p is not lm.adapter.embedding(lm.model).weight and "lm_head" not in name)
    cfg = lm.model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 4 * lm.n_layers * cfg.num_attention_heads * head_dim * attended
    return 2 * weights * tokens + attention


def bench_dtypes(lm: LoadedModel) -> None:
    """Matmul rates per dtype at the model's shapes, natively and under oneDNN ISA caps (fresh processes)."""
    config = lm.model.config.get_text_config()
    for isa in (None, "AVX512_CORE_BF16", "AVX2"):
        rates = rates_under_isa(isa, config.hidden_size, config.intermediate_size)
        label = (isa or "native").lower()
        for dtype in ("bfloat16", "float32"):
            emit(f"matmul_{label}_{dtype}_gflops", f"{rates[dtype]:.1f}")
        emit(f"auto_dtype_{label}", "bfloat16" if rates["bfloat16"] >= BF16_MARGIN * rates["float32"] else "float32")
    emit("model_dtype", str(lm.model.dtype).removeprefix("torch."))


def bench_utilisation(lm: LoadedModel, texts: list[str], cfg) -> None:
    peak = matmul_rate(lm.model.dtype)
    emit(f"matmul_{str(lm.model.dtype).removeprefix('torch.')}_tflops", f"{peak:.3f}")
    ids = lm.encode(texts)
    runner = lm.runner(cfg.runtime.batch_size, progress=False)
    prefix = lm.chat.prefix_ids
    copies = cfg.select.candidates_per_pass
    runner.last_logits_stacked(ids, prefix, copies=copies)  # warm-up
    start = time.perf_counter()
    runner.last_logits_stacked(ids, prefix, copies=copies)
    seconds = time.perf_counter() - start
    bodies = [len(i) - len(prefix) for i in ids]
    tokens = copies * (sum(bodies) + len(prefix))
    attended = copies * sum(b * (len(prefix) + b) for b in bodies)
    unembed = 2 * copies * len(ids) * lm.adapter.embedding(lm.model).weight.numel()
    achieved = (forward_flops(lm, tokens, attended) + unembed) / seconds / 1e12
    emit("forward_project_tflops", f"{achieved:.3f}")
    emit("forward_mfu", f"{achieved / peak:.1%}")


@torch.inference_mode()
def bench_generation(lm: LoadedModel, texts: list[str], max_new_tokens: int, cfg, n_single: int) -> None:
    ids = lm.encode(texts)
    runner = lm.runner(cfg.eval.batch_size, progress=False)
    start = time.perf_counter()
    outputs = runner.generate(ids, lm.chat.prefix_ids, max_new_tokens, lm.eos_ids)
    batched_seconds = time.perf_counter() - start
    batched_rate = sum(map(len, outputs)) / batched_seconds
    emit("generation_batched_tokens_per_s", f"{batched_rate:.1f} ({len(ids)} prompts, {batched_seconds:.1f}s)")
    start, produced = time.perf_counter(), 0
    for prompt in ids[:n_single]:
        out = lm.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=lm.eos_ids, pad_token_id=lm.eos_ids[0])
        produced += sum(t not in lm.eos_ids for t in out[0, len(prompt):].tolist())
    single_rate = produced / (time.perf_counter() - start)
    emit("generation_single_tokens_per_s", f"{single_rate:.1f} ({n_single} prompts, one at a time)")
    emit("generation_speedup", f"{batched_rate / single_rate:.2f}x")


def bench_weight_first(lm: LoadedModel, texts: list[str], max_new_tokens: int, cfg) -> None:
    """Batched greedy generation with every ``nn.Linear`` as ``F.linear`` against the measured weight-first
    choice, on the same prompts: seconds, speed-up and how many completions came out token for token the same."""
    choice = LOADED[lm.name]["weight_first"]
    emit("weight_first_rows", f"{choice['rows']} ({choice['reason']})")
    if choice["rows"] == 0:
        emit("weight_first_speedup", "none: weight-first is not used on this machine")
        return
    ids = lm.encode(texts)
    runner = lm.runner(cfg.eval.batch_size, progress=False)
    seconds, outputs = {}, {}
    for rows in (0, choice["rows"]):
        use_weight_first(lm.model, rows)
        runner.generate(ids[:2], lm.chat.prefix_ids, 2, lm.eos_ids)  # warm-up: one-time costs are not the layout's
        start = time.perf_counter()
        outputs[rows] = runner.generate(ids, lm.chat.prefix_ids, max_new_tokens, lm.eos_ids)
        seconds[rows] = time.perf_counter() - start
    plain, weight_first = seconds[0], seconds[choice["rows"]]
    same = sum(a == b for a, b in zip(outputs[0], outputs[choice["rows"]]))
    emit("weight_first_generation_seconds", f"F.linear {plain:.1f}, weight-first {weight_first:.1f} "
                                            f"({len(ids)} prompts, {max_new_tokens} new tokens)")
    emit("weight_first_speedup", f"{plain / weight_first:.2f}x")
    emit("weight_first_identical_completions", f"{same}/{len(ids)}")


def bench_activation_memory(n_prompts: list[int], paper_dir: Path | None) -> None:
    """Peak RSS of the activations computation in a fresh process, beyond the loaded model."""
    for n in n_prompts:
        result = subprocess.run([sys.executable, "-m", "pipeline.benchmark", "--_activation-memory", str(n),
                                 *(["--paper-dir", str(paper_dir)] if paper_dir else [])],
                                capture_output=True, text=True, check=True)
        emit(f"activations_peak_mb_{n}_prompts", result.stdout.strip().splitlines()[-1])


def _activation_memory_child(n: int, paper_dir: Path | None) -> None:
    cfg = compose_config()
    lm = load_model(cfg.model, cfg.runtime.device)
    prompts = load_prompts(paper_dir, n_train=n, n_val=1)["harmful_train"][:n]
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mean_activations(lm, prompts, cfg.runtime.batch_size, "activations")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{peak - after_load:.0f} above the loaded model ({peak:.0f} total, {len(prompts)} prompts)")


def stage_times() -> None:
    seconds = {s: json.loads(paths.timing(s).read_text())["wall_seconds"] for s in STAGES if paths.timing(s).exists()}
    if not seconds:
        emit("stage_seconds", "none recorded: run `make run` first")
        return
    for stage, value in seconds.items():
        models = json.loads(paths.timing(stage).read_text()).get("models", {})
        dtypes = ", ".join(sorted({m["dtype"] for m in models.values()}))
        emit(f"stage_seconds_{stage}", f"{value}{f' ({dtypes})' if dtypes else ''}")
    emit("stage_seconds_total", round(sum(seconds.values()), 1))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["search"]:  # the head-to-head against heretic (pipeline.benchmark_search)
        from pipeline.benchmark_search import main as search_benchmark

        search_benchmark(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--paper-dir", type=Path, default=Path("../shared/datasets/refusal_direction"))
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--n-single", type=int, default=8, help="prompts for the one-at-a-time generation loop")
    parser.add_argument("--skip-reference", action="store_true", help="skip the (slow) reference selection")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="which figures to measure (default: all)")
    parser.add_argument("--no-filter", action="store_true", help="keep prompts the model does not refuse")
    parser.add_argument("--_activation-memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    paper_dir = args.paper_dir if args.paper_dir.is_dir() else None
    if args._activation_memory:
        _activation_memory_child(args._activation_memory, paper_dir)
        return
    cfg = compose_config(args.overrides)
    set_weight_first_rows(cfg.runtime.weight_first_rows)
    emit("model", cfg.model.name)
    emit("torch_threads", torch.get_num_threads())
    lm = load_model(cfg.model, cfg.runtime.device)
    prompts = load_prompts(paper_dir, args.n_train, args.n_val)
    if not args.no_filter:
        prompts = filter_by_refusal(lm, prompts, cfg.runtime.batch_size)
    sections = {
        "dtypes": lambda: bench_dtypes(lm),
        "selection": lambda: bench_selection(lm, prompts, cfg, args.skip_reference),
        "utilisation": lambda: bench_utilisation(lm, prompts["harmless_val"], cfg),
        "generation": lambda: bench_generation(lm, prompts["harmless_val"], args.max_new_tokens, cfg, args.n_single),
        "weight_first": lambda: bench_weight_first(lm, prompts["harmless_val"], args.max_new_tokens, cfg),
        "memory": lambda: bench_activation_memory([args.n_train // 4, args.n_train], paper_dir),
        "stages": stage_times,
    }
    for name, bench in sections.items():
        if name in args.sections:
            bench()


if __name__ == "__main__":
    main()
