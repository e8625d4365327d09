"""How a stage uses the machine: the model's dtype under ``model.dtype=auto`` and torch's thread count.

``model.dtype=auto``: on CUDA, bfloat16 where the GPU supports it, else float16. On CPU the answer
depends on the chip: with AMX (or AVX-512 BF16) bfloat16 matmuls are several times faster than
float32, without them (AVX2 only) they can be 100x slower. So a short matmul benchmark at the model's
shapes decides, and the result is cached per machine (CPU model and flags, torch version, oneDNN ISA
cap, thread count) in ``cache_dir() / "dtype_choice.json"``. An explicit dtype always wins.

``runtime.weight_first_rows=auto``: on CPU, every plain ``nn.Linear`` computes a product of at most
this many rows as ``weight @ xᵀ`` instead of ``x @ weightᵀ`` (what ``F.linear`` asks the BLAS for).
Same product, another operand order; on some CPUs MKL runs it up to twice as fast for the few rows
of a decoding step (AVX2 EPYC, float32, 24 rows of the 1.5B's 8960×1536 MLP weight: 18 vs 35 ms),
on others it does not. So it is measured at the model's shapes, like the dtype, and cached per machine
in ``cache_dir() / "weight_first_choice.json"``; 0 turns it off, a positive number is used as given.

``runtime.threads=auto``: one thread per core this process may use (CPU affinity and cgroup quota),
divided among ``REFUSAL_WORKERS`` jobs when a launcher runs several on one machine.

``python -m pipeline.runtime --measure`` prints the measured rates as one JSON line, so a benchmark
can measure under another ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX512_CORE_BF16`` or ``AVX2`` to mimic a
machine without AMX) in a fresh process: oneDNN reads the variable once, when it starts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.fetch import cache_dir
from pipeline.io import read_json, write_json

log = logging.getLogger(__name__)

EXPLICIT_DTYPES = ("bfloat16", "float16", "float32")
MEASURED_DTYPES = ("bfloat16", "float32")
# bfloat16 wins on CPU when it is at least as fast as float32 (margin 1.0): at equal compute it still
# halves the weights' memory and bandwidth (decoding is bandwidth-bound), which a matmul benchmark
# does not credit; any slower and float32 is the better choice, being also the more precise one.
BF16_MARGIN = 1.0
TOKENS = 64  # rows per measured matmul: between a decode step of a 32-row batch and a prefill chunk
# One product of at most this many FLOPs takes ~0.4 s where bfloat16 runs at 0.8 GFLOP/s (AVX2 only),
# so a dtype without native support still finishes its measurement in about a second.
MAX_MATMUL_FLOP = 3.2e8
MIN_COLUMNS = 128  # narrower weight slices stop behaving like the full matrix
DTYPE_SECONDS = 0.5  # time box per dtype, shared by its shapes
ISA_ENV = "ONEDNN_MAX_CPU_ISA"
WORKERS_ENV = "REFUSAL_WORKERS"
CPUINFO = Path("/proc/cpuinfo")
CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_DIR = Path("/sys/fs/cgroup/cpu")
WEIGHT_FIRST_ROWS = (8, 32, 128)  # rows measured: decoding steps of small and large batches, a short prompt
WEIGHT_FIRST_MARGIN = 1.1  # weight-first must save 10%: a smaller gain is within the timing noise
MAX_LINEAR_FLOP = 4e9  # per measured product: the embedded model's whole MLP weights fit at 128 rows
LINEAR_REPEATS = 3  # timings per product and layout; the fastest counts (the others caught a hiccup)
LINEAR_SECONDS = 0.25  # a warm-up this slow is timed alone: bfloat16 without AVX-512 runs ~1 GFLOP/s
# The running stage's runtime.weight_first_rows, set by `set_weight_first_rows`; library use measures.
WEIGHT_FIRST = {"setting": "auto"}
# How this process loaded each model ({name: {"dtype", "reason", "rates", "weight_first"}}), for the stage's
# timing record.
LOADED: dict[str, dict] = {}


@dataclass
class DtypeChoice:
    """The dtype a run uses and why; ``asdict`` of it goes into the run's provenance."""

    dtype: str
    reason: str
    rates: dict[str, float] = field(default_factory=dict)  # GFLOP/s per dtype, when measured
    key: str = ""  # the machine key the measurement is cached under


def measure_matmul(dtype: torch.dtype, shape: tuple[int, int, int], seconds: float) -> float:
    """GFLOP/s of ``[m, k] @ [k, n]`` in ``dtype``, repeated for about ``seconds`` after one warm-up.

    When the warm-up alone uses the time box (a dtype without native support), its own rate is the
    answer: one-time costs are negligible next to such a slow product, and repeating it would not fit.
    """
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    flop = 2 * m * k * n
    start = time.perf_counter()
    a @ b
    warmup = time.perf_counter() - start
    if warmup >= seconds:
        return flop / warmup / 1e9
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds - warmup:
        a @ b
        count += 1
    return flop * count / (time.perf_counter() - start) / 1e9


def _sliced(m: int, k: int, n: int) -> tuple[int, int, int]:
    """``(m, k, n)`` with only as many weight columns as keep one product under ``MAX_MATMUL_FLOP``.

    Output columns are computed independently, so a slice of them runs at the full matrix's rate.
    """
    return m, k, min(n, max(MIN_COLUMNS, int(MAX_MATMUL_FLOP // (2 * m * k))))


def hidden_sizes(text_config: Any) -> tuple[int, int]:
    """The model's hidden and MLP intermediate sizes (4x hidden where the config names none)."""
    hidden = text_config.hidden_size
    return hidden, getattr(text_config, "intermediate_size", None) or 4 * hidden


def model_shapes(text_config: Any, tokens: int = TOKENS) -> list[tuple[int, int, int]]:
    """Matmul shapes typical of the model: an attention projection and the MLP down projection."""
    hidden, intermediate = hidden_sizes(text_config)
    return [_sliced(tokens, hidden, hidden), _sliced(tokens, intermediate, hidden)]


def measure_rates(shapes: list[tuple[int, int, int]]) -> dict[str, float]:
    """GFLOP/s per candidate CPU dtype over one product of each shape (total FLOPs / total time)."""
    rates: dict[str, float] = {}
    for name in MEASURED_DTYPES:
        flops = [2 * m * k * n for m, k, n in shapes]
        measured = [measure_matmul(getattr(torch, name), shape, DTYPE_SECONDS / len(shapes)) for shape in shapes]
        rates[name] = round(sum(flops) / sum(f / r for f, r in zip(flops, measured)), 3)
    return rates


def cpu_info(cpuinfo: Path = CPUINFO) -> tuple[str, list[str]]:
    """The CPU's model name and its feature flags (``/proc/cpuinfo``; the platform's name elsewhere)."""
    fields: dict[str, str] = {}
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            name, sep, value = line.partition(":")
            if sep:
                fields.setdefault(name.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine()
    return model, sorted((fields.get("flags") or fields.get("Features") or "").split())


def cpu_key(cpuinfo: Path = CPUINFO) -> str:
    """What a CPU measurement depends on: chip, its flags, torch, the oneDNN ISA cap and thread count."""
    model, flags = cpu_info(cpuinfo)
    flags = " ".join(flags)
    return (f"{model} | flags {hashlib.sha256(flags.encode()).hexdigest()[:12]} | torch {torch.__version__} | "
            f"{ISA_ENV}={os.environ.get(ISA_ENV) or 'unset'} | threads {torch.get_num_threads()}")


def cached_measurement(cache_file: Path, key: str, measure: Callable[[], dict]) -> tuple[dict, str]:
    """The entry cached under this machine's ``key`` in ``cache_file``, else ``measure()``'s, stored there;
    and the reason to record (cached or measured)."""
    entries = read_json(cache_file) if cache_file.exists() else {}
    if key in entries:
        return entries[key], f"auto: cached CPU measurement ({cache_file})"
    entry = measure()
    write_json(cache_file, {**entries, key: entry})
    return entry, "auto: measured on this CPU"


def _measured_cpu_dtype(text_config: Any, cache_file: Path) -> DtypeChoice:
    """bfloat16 or float32 by measurement at the model's shapes, cached under this machine's key."""
    shapes = model_shapes(text_config)
    key = f"{cpu_key()} | shapes {shapes}"

    def measure() -> dict:
        rates = measure_rates(shapes)
        return {"dtype": "bfloat16" if rates["bfloat16"] >= BF16_MARGIN * rates["float32"] else "float32",
                "rates": rates}

    entry, reason = cached_measurement(cache_file, key, measure)
    choice = DtypeChoice(entry["dtype"], reason, entry["rates"], key)
    log.info("model.dtype=auto -> %s (bfloat16 %.2f vs float32 %.2f GFLOP/s; %s)", choice.dtype,
             choice.rates["bfloat16"], choice.rates["float32"], choice.reason)
    return choice


def choose_dtype(requested: str, device: str, text_config: Any, cache_file: Path | None = None) -> DtypeChoice:
    """The dtype to load the model in: ``requested`` if explicit, else the fastest for ``device``.

    ``device`` is resolved already (``cpu`` or ``cuda[:n]``); ``text_config`` gives the shapes measured.
    """
    if requested in EXPLICIT_DTYPES:
        return DtypeChoice(requested, "explicit")
    if requested != "auto":
        raise ConfigError(f"model.dtype={requested!r}", f"use one of: auto, {', '.join(EXPLICIT_DTYPES)}")
    if device.startswith("cuda"):
        bf16 = torch.cuda.is_bf16_supported()
        choice = DtypeChoice("bfloat16" if bf16 else "float16",
                             f"auto: CUDA GPU {'supports' if bf16 else 'lacks'} bfloat16")
        log.info("model.dtype=auto -> %s (%s)", choice.dtype, choice.reason)
        return choice
    if device != "cpu":
        raise ConfigError(f"model.dtype=auto is not defined on device {device!r}",
                          f"set model.dtype to one of: {', '.join(EXPLICIT_DTYPES)}")
    return _measured_cpu_dtype(text_config, cache_file or cache_dir() / "dtype_choice.json")


@dataclass
class WeightFirstChoice:
    """Up to how many rows ``nn.Linear`` computes weight-first, and why (kept in the stage's timing record)."""

    rows: int
    reason: str
    seconds: dict[str, list[float]] = field(default_factory=dict)  # rows -> [F.linear, weight-first], measured
    key: str = ""


def weight_first_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``weight @ xᵀ`` (see the module docstring for why)."""
    flat = x.reshape(-1, x.shape[-1])
    out = (weight @ flat.T).T
    if bias is not None:
        out = out + bias
    return out.contiguous().reshape(*x.shape[:-1], weight.shape[0])


def linear_shapes(text_config: Any, rows: int) -> list[tuple[int, int]]:
    """``(out, in)`` of an attention projection, the MLP's up and down projections, with as many output
    features as keep ``rows`` rows under ``MAX_LINEAR_FLOP`` (output features are independent)."""
    hidden, intermediate = hidden_sizes(text_config)
    return [(min(out, max(MIN_COLUMNS, int(MAX_LINEAR_FLOP // (2 * rows * inp)))), inp)
            for out, inp in [(hidden, hidden), (intermediate, hidden), (hidden, intermediate)]]


def _fastest(fn: Callable[..., Any], *args: Any) -> float:
    """Seconds of the fastest of ``LINEAR_REPEATS`` calls of ``fn(*args)`` after one warm-up; just the
    warm-up's when that alone took ``LINEAR_SECONDS`` (a dtype this CPU runs slowly: one call is enough)."""
    start = time.perf_counter()
    fn(*args)
    warmup = time.perf_counter() - start
    if warmup >= LINEAR_SECONDS:
        return warmup
    times = []
    for _ in range(LINEAR_REPEATS):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def measure_linear(rows: int, shapes: list[tuple[int, int]], dtype: torch.dtype) -> tuple[float, float]:
    """Seconds of ``F.linear`` and of ``weight_first_linear`` over one product of each shape."""
    linear = weight_first = 0.0
    for out, inp in shapes:
        x, weight = torch.randn(rows, inp, dtype=dtype), torch.randn(out, inp, dtype=dtype)
        linear += _fastest(F.linear, x, weight)
        weight_first += _fastest(weight_first_linear, x, weight)
    return linear, weight_first


def set_weight_first_rows(setting: int | str) -> None:
    """Make ``runtime.weight_first_rows`` the setting of every model this process loads from now on."""
    if setting != "auto" and not (isinstance(setting, int) and not isinstance(setting, bool) and setting >= 0):
        raise ConfigError(f"runtime.weight_first_rows={setting!r}",
                          "use auto (measured on this CPU), 0 (never) or a positive number of rows")
    WEIGHT_FIRST["setting"] = setting


def choose_weight_first_rows(device: str, text_config: Any, dtype: torch.dtype,
                             cache_file: Path | None = None) -> WeightFirstChoice:
    """Rows up to which ``nn.Linear`` computes weight-first under the process's setting (see the module
    docstring): with ``auto``, the most measured rows up to which weight-first saves ``WEIGHT_FIRST_MARGIN``
    at every measured count."""
    setting = WEIGHT_FIRST["setting"]
    if setting != "auto":
        return WeightFirstChoice(setting, "explicit")
    if device != "cpu":
        return WeightFirstChoice(0, f"auto: {device} is not a CPU")
    cache_file = cache_file or cache_dir() / "weight_first_choice.json"
    shapes = {rows: linear_shapes(text_config, rows) for rows in WEIGHT_FIRST_ROWS}
    key = f"{cpu_key()} | {dtype} | shapes {shapes}"

    def measure() -> dict:
        seconds = {str(rows): [round(t, 6) for t in measure_linear(rows, shapes[rows], dtype)]
                   for rows in WEIGHT_FIRST_ROWS}
        chosen = 0
        for rows in WEIGHT_FIRST_ROWS:  # ascending: stop at the first count where weight-first does not win
            linear, weight_first = seconds[str(rows)]
            if linear < WEIGHT_FIRST_MARGIN * weight_first:
                break
            chosen = rows
        return {"rows": chosen, "seconds": seconds}

    entry, reason = cached_measurement(cache_file, key, measure)
    choice = WeightFirstChoice(entry["rows"], reason, entry["seconds"], key)
    log.info("runtime.weight_first_rows=auto -> %d (seconds F.linear vs weight-first per rows: %s; %s)",
             choice.rows, choice.seconds, choice.reason)
    return choice


def _cgroup_cores(v2_max: Path, v1_dir: Path) -> int | None:
    """Cores allowed by the cgroup CPU quota (rounded up), or None without a quota."""
    if v2_max.exists():
        quota, period = v2_max.read_text().split()[:2]
        return None if quota == "max" else math.ceil(int(quota) / int(period))
    quota_file, period_file = v1_dir / "cpu.cfs_quota_us", v1_dir / "cpu.cfs_period_us"
    if quota_file.exists() and period_file.exists():
        quota, period = int(quota_file.read_text()), int(period_file.read_text())
        return None if quota <= 0 else math.ceil(quota / period)
    return None


def available_cores(cgroup_v2_max: Path = CGROUP_V2_MAX, cgroup_v1_dir: Path = CGROUP_V1_DIR) -> int:
    """Cores this process may use: its CPU affinity, capped by a container's cgroup CPU quota.

    ``os.cpu_count()`` counts the whole machine, which oversubscribes a pinned or quota-limited job.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    quota = _cgroup_cores(cgroup_v2_max, cgroup_v1_dir)
    return max(1, min(cores, quota) if quota is not None else cores)


def machine() -> str:
    """The CPU in words: AMX or not decides bfloat16's speed, so a measured rate means little without it."""
    model, flags = cpu_info()
    amx = "with AMX" if "amx_bf16" in flags else "without AMX"
    return f"{model}, {available_cores()} cores {amx} ({platform.machine()})"


def workers_from_env() -> int:
    """Jobs sharing this machine, as a launcher announces them in ``REFUSAL_WORKERS`` (default 1)."""
    value = os.environ.get(WORKERS_ENV, "").strip()
    if not value:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{WORKERS_ENV}={value!r}",
                          "set it to the number of jobs sharing this machine (a positive integer), or unset it")
    return int(value)


def resolve_threads(setting: int | str, workers: int = 1) -> int:
    """Torch threads for ``runtime.threads``: a positive int as is, ``auto`` a fair share of the cores."""
    if setting == "auto":
        return max(1, available_cores() // workers)
    if isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1:
        return setting
    raise ConfigError(f"runtime.threads={setting!r}", "use a positive integer or auto")


def apply_threads(setting: int | str, workers: int | None = None) -> int:
    """Set torch's thread count from ``runtime.threads`` (workers from the environment by default)."""
    threads = resolve_threads(setting, workers_from_env() if workers is None else workers)
    torch.set_num_threads(threads)
    log.info("runtime.threads=%s -> %d torch threads", setting, threads)
    return threads


def warn_if_oversubscribed(cores: int | None = None, load: float | None = None) -> bool:
    """Warn when the 1-minute load exceeds the cores: every timing of this stage will be slow and noisy.

    The load average counts every process on the machine, so it is compared with the machine's
    cores (``os.cpu_count()``), not with this process's share of them.
    """
    cores = cores or os.cpu_count() or 1
    load = os.getloadavg()[0] if load is None else load
    if load <= cores:
        return False
    log.warning("the machine is oversubscribed: 1-minute load %.1f on %d cores, so this stage runs slower "
                "than it should. Stop the other job, or give each job fewer threads (runtime.threads=N, or "
                "%s=<jobs on this machine> with runtime.threads=auto)", load, cores, WORKERS_ENV)
    return True


def rates_under_isa(isa: str | None, hidden: int, intermediate: int) -> dict[str, Any]:
    """``measure_rates`` in a fresh process with ``ONEDNN_MAX_CPU_ISA=isa`` (None: unset).

    oneDNN reads the variable once, when it loads, so only a new process can measure under another cap.
    """
    env = {name: value for name, value in os.environ.items() if name != ISA_ENV}
    if isa is not None:
        env[ISA_ENV] = isa
    cmd = [sys.executable, "-m", "pipeline.runtime", "--measure", "--hidden", str(hidden),
           "--intermediate", str(intermediate)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} ({ISA_ENV}={isa}) failed: {result.stderr.strip()[-600:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", required=True,
                        help="print the bfloat16 and float32 matmul rates (GFLOP/s) as one JSON line")
    parser.add_argument("--hidden", type=int, default=1536, help="hidden size (default: the embedded model's)")
    parser.add_argument("--intermediate", type=int, default=8960, help="MLP intermediate size")
    args = parser.parse_args(argv)
    text_config = SimpleNamespace(hidden_size=args.hidden, intermediate_size=args.intermediate)
    print(json.dumps({**measure_rates(model_shapes(text_config)), "key": cpu_key()}))


if __name__ == "__main__":
    main()
