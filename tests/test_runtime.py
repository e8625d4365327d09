"""Dtype and thread choices: the decision logic with the matmul measurement stubbed at its one boundary."""

import logging
from types import SimpleNamespace

import pytest
import torch

from pipeline import runtime
from pipeline.errors import ConfigError
from pipeline.io import read_json

CONFIG = SimpleNamespace(hidden_size=64, intermediate_size=256)


@pytest.fixture
def rates(monkeypatch):
    """Stub ``measure_matmul`` with fixed GFLOP/s per dtype; ``calls`` records every measurement."""
    stub = SimpleNamespace(rates={torch.bfloat16: 10.0, torch.float32: 5.0}, calls=[])

    def measure(dtype, shape, seconds):
        stub.calls.append((dtype, shape))
        return stub.rates[dtype]

    monkeypatch.setattr(runtime, "measure_matmul", measure)
    monkeypatch.delenv(runtime.ISA_ENV, raising=False)
    return stub


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_explicit_dtype_wins_without_measuring(rates, tmp_path, dtype):
    choice = runtime.choose_dtype(dtype, "cpu", CONFIG, tmp_path / "cache.json")
    assert (choice.dtype, choice.reason, choice.rates) == (dtype, "explicit", {})
    assert rates.calls == [] and not (tmp_path / "cache.json").exists()


@pytest.mark.parametrize(("bf16", "expected"), [(10.0, "bfloat16"), (5.0, "bfloat16"), (0.9, "float32")])
def test_cpu_auto_picks_the_faster_dtype(rates, tmp_path, caplog, bf16, expected):
    rates.rates[torch.bfloat16] = bf16
    with caplog.at_level(logging.INFO, logger="pipeline.runtime"):
        choice = runtime.choose_dtype("auto", "cpu", CONFIG, tmp_path / "cache.json")
    assert choice.dtype == expected
    assert choice.rates == {"bfloat16": bf16, "float32": 5.0}
    assert {dtype for dtype, _ in rates.calls} == {torch.bfloat16, torch.float32}
    assert f"-> {expected}" in caplog.text and "GFLOP/s" in caplog.text


def test_cpu_choice_is_cached_per_machine_key(rates, tmp_path, monkeypatch):
    cache = tmp_path / "cache.json"
    first = runtime.choose_dtype("auto", "cpu", CONFIG, cache)
    measured = len(rates.calls)
    rates.rates[torch.bfloat16] = 1.0  # a new measurement would now choose float32
    second = runtime.choose_dtype("auto", "cpu", CONFIG, cache)
    assert len(rates.calls) == measured
    assert (second.dtype, second.rates, second.key) == (first.dtype, first.rates, first.key) == \
        ("bfloat16", {"bfloat16": 10.0, "float32": 5.0}, first.key)
    assert "cached" in second.reason

    monkeypatch.setenv(runtime.ISA_ENV, "AVX2")
    capped = runtime.choose_dtype("auto", "cpu", CONFIG, cache)
    assert len(rates.calls) == 2 * measured
    assert capped.dtype == "float32" and "ONEDNN_MAX_CPU_ISA=AVX2" in capped.key
    assert set(read_json(cache)) == {first.key, capped.key}


def test_other_model_shapes_measure_again(rates, tmp_path):
    cache = tmp_path / "cache.json"
    runtime.choose_dtype("auto", "cpu", CONFIG, cache)
    measured = len(rates.calls)
    runtime.choose_dtype("auto", "cpu", SimpleNamespace(hidden_size=32, intermediate_size=128), cache)
    assert len(rates.calls) == 2 * measured


def test_default_cache_lives_in_the_pipeline_cache(rates, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_CACHE", str(tmp_path))
    choice = runtime.choose_dtype("auto", "cpu", CONFIG)
    assert choice.key in read_json(tmp_path / "dtype_choice.json")


@pytest.mark.parametrize(("supported", "expected"), [(True, "bfloat16"), (False, "float16")])
def test_cuda_auto_follows_bf16_support(rates, monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    assert runtime.choose_dtype("auto", "cuda:0", CONFIG).dtype == expected
    assert rates.calls == []


def test_unknown_dtype_names_the_valid_values(rates):
    with pytest.raises(ConfigError, match="auto, bfloat16, float16, float32"):
        runtime.choose_dtype("fp8", "cpu", CONFIG)
    with pytest.raises(ConfigError, match="bfloat16, float16, float32"):
        runtime.choose_dtype("auto", "mps", CONFIG)


def test_model_shapes_keep_each_product_small():
    shapes = runtime.model_shapes(SimpleNamespace(hidden_size=1536, intermediate_size=8960))
    assert shapes[0] == (runtime.TOKENS, 1536, 1536)  # small enough to measure whole
    assert shapes[1][:2] == (runtime.TOKENS, 8960) and runtime.MIN_COLUMNS <= shapes[1][2] < 1536
    assert all(2 * m * k * n <= runtime.MAX_MATMUL_FLOP for m, k, n in shapes)
    assert runtime.model_shapes(SimpleNamespace(hidden_size=64))[1] == (runtime.TOKENS, 256, 64)


def test_measure_matmul_really_measures():
    assert runtime.measure_matmul(torch.float32, (8, 16, 8), 0.01) > 0


def test_cpu_key_reads_model_and_flags(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: avx2 fma\n\n"
                       "processor\t: 1\nmodel name\t: Test CPU\nflags\t\t: avx2 fma\n")
    monkeypatch.delenv(runtime.ISA_ENV, raising=False)
    key = runtime.cpu_key(cpuinfo)
    assert key.startswith("Test CPU | flags ") and f"torch {torch.__version__}" in key
    assert "ONEDNN_MAX_CPU_ISA=unset" in key and f"threads {torch.get_num_threads()}" in key
    cpuinfo.write_text("model name\t: Test CPU\nflags\t\t: avx2 fma amx_bf16\n")
    assert runtime.cpu_key(cpuinfo) != key


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


@pytest.mark.parametrize(("cpu_max", "expected"), [("150000 100000\n", 2), ("max 100000\n", 8), ("50000 100000", 1)])
def test_available_cores_honours_cgroup_v2(tmp_path, eight_cpus, cpu_max, expected):
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert runtime.available_cores(tmp_path / "cpu.max", tmp_path / "v1") == expected


@pytest.mark.parametrize(("quota", "expected"), [("300000", 3), ("-1", 8)])
def test_available_cores_honours_cgroup_v1(tmp_path, eight_cpus, quota, expected):
    (tmp_path / "cpu.cfs_quota_us").write_text(quota + "\n")
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    assert runtime.available_cores(tmp_path / "absent", tmp_path) == expected


def test_available_cores_without_cgroup_is_the_affinity(tmp_path, eight_cpus):
    assert runtime.available_cores(tmp_path / "absent", tmp_path / "absent") == 8


def test_resolve_threads(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    assert runtime.resolve_threads("auto") == 8
    assert runtime.resolve_threads("auto", workers=2) == 4
    assert runtime.resolve_threads("auto", workers=16) == 1
    assert runtime.resolve_threads(3, workers=2) == 3
    for bad in (0, -1, True, "four", 2.5):
        with pytest.raises(ConfigError, match="positive integer or auto"):
            runtime.resolve_threads(bad)


def test_apply_threads_shares_the_cores_among_workers(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    monkeypatch.setenv(runtime.WORKERS_ENV, "2")
    before = torch.get_num_threads()
    try:
        assert runtime.apply_threads("auto") == 1 == torch.get_num_threads()
        assert runtime.apply_threads("auto", workers=1) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("value", "expected"), [(None, 1), ("", 1), ("3", 3), (" 2 ", 2)])
def test_workers_from_env(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(runtime.WORKERS_ENV, raising=False)
    else:
        monkeypatch.setenv(runtime.WORKERS_ENV, value)
    assert runtime.workers_from_env() == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_workers_value_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv(runtime.WORKERS_ENV, value)
    with pytest.raises(ConfigError, match="REFUSAL_WORKERS"):
        runtime.workers_from_env()


def test_warn_if_oversubscribed(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.runtime"):
        assert not runtime.warn_if_oversubscribed(cores=4, load=3.9)
        assert caplog.text == ""
        assert runtime.warn_if_oversubscribed(cores=4, load=6.5)
    assert "load 6.5 on 4 cores" in caplog.text and "runtime.threads" in caplog.text
    assert "REFUSAL_WORKERS" in caplog.text


def test_rates_under_isa_measures_in_a_subprocess():
    rates = runtime.rates_under_isa("AVX2", hidden=32, intermediate=64)
    assert rates["bfloat16"] > 0 and rates["float32"] > 0
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in rates["key"]


@pytest.fixture
def linear_seconds(monkeypatch):
    """Stub ``measure_linear`` with fixed seconds per rows ([F.linear, weight-first]); ``calls`` records rows."""
    stub = SimpleNamespace(seconds={8: (2.0, 1.0), 32: (2.0, 1.5), 128: (1.0, 1.0)}, calls=[])

    def measure(rows, shapes, dtype):
        stub.calls.append(rows)
        return stub.seconds[rows]

    monkeypatch.setattr(runtime, "measure_linear", measure)
    monkeypatch.setattr(runtime, "WEIGHT_FIRST", {"setting": "auto"})
    return stub


def choose_rows(cache) -> runtime.WeightFirstChoice:
    return runtime.choose_weight_first_rows("cpu", CONFIG, torch.float32, cache)


@pytest.mark.parametrize(("seconds", "expected"), [
    ({8: (2.0, 1.0), 32: (2.0, 1.5), 128: (1.0, 1.0)}, 32),  # wins up to 32 rows, ties at 128
    ({8: (2.0, 1.0), 32: (2.0, 1.0), 128: (2.0, 1.0)}, 128),
    ({8: (1.0, 1.0), 32: (2.0, 1.0), 128: (2.0, 1.0)}, 0),  # no gain at the fewest rows: never
    ({8: (2.0, 1.0), 32: (1.05, 1.0), 128: (2.0, 1.0)}, 8),  # a 5% gain is noise; larger counts stay off
])
def test_weight_first_is_used_up_to_the_rows_where_it_was_measured_faster(linear_seconds, tmp_path, seconds,
                                                                         expected):
    linear_seconds.seconds = seconds
    choice = choose_rows(tmp_path / "cache.json")
    assert choice.rows == expected and choice.reason == "auto: measured on this CPU"
    assert choice.seconds == {str(rows): list(pair) for rows, pair in seconds.items()}


def test_weight_first_choice_is_cached_per_machine_and_dtype(linear_seconds, tmp_path):
    cache = tmp_path / "cache.json"
    first = choose_rows(cache)
    linear_seconds.seconds = {rows: (1.0, 1.0) for rows in runtime.WEIGHT_FIRST_ROWS}
    second = choose_rows(cache)
    assert (second.rows, second.key) == (first.rows, first.key) == (32, first.key) and "cached" in second.reason
    assert linear_seconds.calls == list(runtime.WEIGHT_FIRST_ROWS)
    assert runtime.choose_weight_first_rows("cpu", CONFIG, torch.bfloat16, cache).rows == 0  # measured anew
    assert len(read_json(cache)) == 2


@pytest.mark.parametrize(("setting", "device", "expected", "reason"), [
    (0, "cpu", 0, "explicit"), (48, "cpu", 48, "explicit"), ("auto", "cuda:0", 0, "auto: cuda:0 is not a CPU")])
def test_explicit_rows_and_gpus_measure_nothing(linear_seconds, tmp_path, setting, device, expected, reason):
    runtime.set_weight_first_rows(setting)
    choice = runtime.choose_weight_first_rows(device, CONFIG, torch.float32, tmp_path / "cache.json")
    assert (choice.rows, choice.reason) == (expected, reason)
    assert linear_seconds.calls == [] and not (tmp_path / "cache.json").exists()


@pytest.mark.parametrize("setting", [-1, "fast", True, 2.5])
def test_bad_weight_first_setting_says_what_to_use(linear_seconds, setting):
    with pytest.raises(ConfigError, match="auto .* 0 .* positive number of rows"):
        runtime.set_weight_first_rows(setting)
    assert runtime.WEIGHT_FIRST["setting"] == "auto"


@pytest.mark.parametrize("bias", [False, True])
def test_weight_first_linear_is_the_same_product(bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias)
    x = torch.randn(3, 5, 48)
    out = runtime.weight_first_linear(x, layer.weight, layer.bias)
    assert out.shape == (3, 5, 80) and out.is_contiguous()
    torch.testing.assert_close(out, layer(x))


def test_linear_shapes_cover_attention_and_both_mlp_projections_within_the_flop_cap():
    config = SimpleNamespace(hidden_size=1536, intermediate_size=8960)
    assert runtime.linear_shapes(config, 128) == [(1536, 1536), (8960, 1536), (1536, 8960)]  # whole at 128 rows
    big = SimpleNamespace(hidden_size=8192, intermediate_size=28672)
    shapes = runtime.linear_shapes(big, 128)
    assert [inp for _, inp in shapes] == [8192, 8192, 28672]
    assert all(2 * 128 * out * inp <= runtime.MAX_LINEAR_FLOP for out, inp in shapes)


@pytest.mark.parametrize(("pause", "calls"), [(0.0, 1 + runtime.LINEAR_REPEATS), (0.02, 1)])
def test_a_product_this_cpu_runs_slowly_is_timed_once(monkeypatch, pause, calls):
    import time

    monkeypatch.setattr(runtime, "LINEAR_SECONDS", 0.01)
    made = []
    seconds = runtime._fastest(lambda: (made.append(1), time.sleep(pause)))
    assert len(made) == calls and seconds >= pause
