"""`make run` says what it will run and roughly for how long, from timings and this CPU's matmul rate."""

import json
import subprocess
import sys

from pipeline.plan import REFERENCES, dtype_in_use, estimates, for_dtype, read_references, stages_to_run


def test_a_stage_that_ran_here_before_is_estimated_by_its_own_time(tmp_path):
    (tmp_path / "filter.json").write_text(json.dumps({"stage": "filter", "wall_seconds": 42.0}))
    reference = {"rate_gflops": 100.0, "stages": {"filter": 10.0, "select": 300.0}}
    rows = estimates(["filter", "select", "report"], reference, 50.0, timing_dir=tmp_path)
    assert [(r.stage, r.seconds) for r in rows] == [("filter", 42.0), ("select", 600.0), ("report", None)]
    assert rows[0].source == "last run here" and "x 2.00" in rows[1].source  # a CPU half as fast: twice as long


def test_without_a_reference_only_stages_timed_here_are_estimated(tmp_path):
    assert [r.seconds for r in estimates(["select"], None, None, timing_dir=tmp_path)] == [None]


def test_auto_dtype_is_the_faster_one_and_an_explicit_dtype_wins():
    assert dtype_in_use("auto", {"bfloat16": 50.0, "float32": 100.0}) == "float32"
    assert dtype_in_use("auto", {"bfloat16": 400.0, "float32": 100.0}) == "bfloat16"
    assert dtype_in_use("bfloat16", {"bfloat16": 50.0, "float32": 100.0}) == "bfloat16"


def test_a_cpu_is_compared_with_the_reference_run_in_the_dtype_it_uses():
    """bfloat16 is chosen where AMX makes it fast, and there decoding gains less than matmuls do: scaling the
    float32 machine's run by the matmul rate alone underestimated an AMX machine's run by 40%."""
    float32, bfloat16 = {"dtype": "float32"}, {"dtype": "bfloat16"}
    assert for_dtype({"float32": float32, "bfloat16": bfloat16}, "bfloat16") is bfloat16
    assert for_dtype({"float32": float32, "bfloat16": bfloat16}, "float32") is float32
    assert for_dtype({"float32": float32}, "bfloat16") is float32  # no run in that dtype: the rate alone
    assert for_dtype({}, "float32") is None
    shipped = read_references(REFERENCES)
    assert set(shipped) >= {"float32"} and all(ref["dtype"] == dtype for dtype, ref in shipped.items())


def test_a_changed_parameter_reruns_its_stage_and_every_stage_downstream(tmp_path):
    """A three-stage DVC project: after a full run nothing is planned; a parameter of the middle stage
    plans it and the stage after it, not the one before."""
    (tmp_path / "params.yaml").write_text("a: 1\nb: 1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  data: {cmd: echo a > a.txt, params: [a], outs: [a.txt]}\n"
        "  filter: {cmd: cat a.txt > b.txt, deps: [a.txt], params: [b], outs: [b.txt]}\n"
        "  activations: {cmd: cat b.txt > c.txt, deps: [b.txt], outs: [c.txt]}\n")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    assert stages_to_run(tmp_path) == ["data", "filter", "activations"]
    subprocess.run([*dvc, "repro", "-q"], cwd=tmp_path, check=True)
    assert stages_to_run(tmp_path) == []
    (tmp_path / "params.yaml").write_text("a: 1\nb: 2\n")
    assert stages_to_run(tmp_path) == ["filter", "activations"]
