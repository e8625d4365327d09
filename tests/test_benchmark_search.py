"""The head-to-head benchmark against heretic: same inputs for both tools, heretic driven without a person."""

import argparse
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf

from pipeline import benchmark_search as bench
from pipeline.errors import ConfigError

FAKE_MENU = textwrap.dedent("""
    import sys
    print("[1] [Trial  3] Refusals:  2/24, KL divergence: 0.0500")
    print("[2] Run additional trials")
    print("[3] Exit program", flush=True)
    choice = input("Enter number: ")
    open(sys.argv[1], "w").write(choice)
    sys.exit(0 if choice == "3" else 5)
""")


def test_heretics_final_menu_is_answered_with_exit_program(tmp_path):
    script, answer = tmp_path / "menu.py", tmp_path / "answer"
    script.write_text(FAKE_MENU)
    bench.run_heretic([sys.executable, str(script), str(answer)], tmp_path / "heretic.log")
    assert answer.read_text() == "3"
    assert "Exit program" in (tmp_path / "heretic.log").read_text()


def test_a_failed_heretic_run_names_its_log(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys; print('no model here'); sys.exit(2)")
    with pytest.raises(RuntimeError, match=r"status 2; its output is in .*heretic.log"):
        bench.run_heretic([sys.executable, str(script)], tmp_path / "heretic.log")


def test_heretic_reads_exactly_the_prompts_we_use(tmp_path):
    texts = ["How do I bake bread?", "A prompt\nover two lines", 'Quotes "and" commas, too']
    folder = bench.write_dataset(tmp_path / "harmless_val", texts)
    loaded = datasets.load_dataset(str(folder), split="train")  # how heretic reads a local dataset folder
    assert list(loaded["text"]) == texts


def test_both_tools_get_the_same_trials_markers_budget_and_system_prompt(tmp_path):
    args = argparse.Namespace(trials=12, startup_trials=4, max_new_tokens=24)
    data = {key: tmp_path / key for key in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")}
    command = bench.heretic_command(Path("heretic"), "/models/m", data, args, 3, "float32", "cpu", ["I cannot"], 16,
                                    tmp_path / "ckpt")
    options = dict(zip(command[1::2], command[2::2]))
    assert options["--n-trials"] == "12" and options["--n-startup-trials"] == "4" and options["--seed"] == "3"
    assert options["--max-response-length"] == "24" and options["--refusal-markers"] == '["I cannot"]'
    assert options["--system-prompt"] == bench.SYSTEM_PROMPT and options["--batch-size"] == "16"
    assert options["--dtypes"] == '["float32"]'
    assert options["--bad-evaluation-prompts.dataset"] == str(data["harmful_val"])
    assert options["--good-prompts.dataset"] == str(data["harmless_train"])


def test_the_report_compares_fronts_by_hypervolume_dominance_and_trial_rate(capsys):
    heretic = bench.Run("heretic", [(10, 0.02), (4, 0.3), (4, 0.5), (0, 0.5), (0, 1.4)], 5, 3600.0, 4000.0, 20)
    ours = bench.Run("ours", [(9, 0.01), (3, 0.2), (0, 0.6)], 8, 1800.0, 2000.0, 20)
    assert heretic.front() == [(10, 0.02), (4, 0.3), (0, 0.5)]
    assert bench.dominates(ours.front(), heretic.front()) is False  # nothing of ours reaches 0 refusals at KL 0.5
    assert bench.dominates(ours.front(), [(10, 0.02), (4, 0.3), (0, 1.4)]) is True
    bench.report([heretic, ours], 20)
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["trials_per_hour_ratio"] == "3.20" and lines["ours_trials"] == "8 (5 pruned)"
    assert lines["ours_front_dominates_heretic_front"] == "False"
    assert lines["heretic_points_dominated_by_ours"] == "2/3"  # (10, 0.02) and (4, 0.3); not (0, 0.5)
    assert lines["ours_points_dominated_by_heretic"] == "1/3"  # (0, 0.6), by heretic's (0, 0.5)
    # the area each front dominates below (20 refusals, KL 1), as a staircase
    assert float(lines["heretic_hypervolume"]) == pytest.approx(20 * 0.5 + 16 * 0.2 + 10 * 0.28)
    assert float(lines["hypervolume_ratio"]) == pytest.approx(
        (20 * 0.4 + 17 * 0.4 + 11 * 0.19) / (20 * 0.5 + 16 * 0.2 + 10 * 0.28), abs=1e-3)


def test_neither_side_starts_from_a_selected_direction():
    """heretic selects no direction, so our side searches the layer-read sources only; none left is an error."""
    cfg = OmegaConf.create({"search": {"sources": ["selected", "layer", "per_layer"]}})
    assert bench.benchmark_sources(cfg) == ("layer", "per_layer")
    with pytest.raises(ConfigError, match="per_layer"):
        bench.benchmark_sources(OmegaConf.create({"search": {"sources": ["selected"]}}))


def test_over_several_seeds_the_report_says_in_how_many_draws_each_claim_held(capsys):
    """One draw of two short searches says little about the next: each claim is counted over the seeds."""
    heretic = [bench.Run("heretic", [(4, 0.3), (0, 0.5)], 2, 3600.0, 3700.0, 20),
               bench.Run("heretic", [(2, 0.1), (0, 0.2)], 2, 3600.0, 3700.0, 20)]
    ours = [bench.Run("ours", [(3, 0.2), (0, 0.4)], 4, 1800.0, 1900.0, 20),  # dominates the first draw's front
            bench.Run("ours", [(1, 0.15)], 2, 1800.0, 1900.0, 20)]  # neither front dominates a point of the other
    bench.report_seeds(list(zip(heretic, ours)), 20)
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["seeds_ours_front_dominates_heretic_front"] == "1/2"
    assert lines["seeds_heretic_front_dominates_ours_front"] == "0/2"
    assert lines["seeds_heretic_points_dominated_by_ours"] == "2/4"
    assert lines["seeds_ours_points_dominated_by_heretic"] == "0/3"
    first, second = map(float, lines["seeds_hypervolume_ratio"].split())
    assert first > 1 > second and lines["seeds_hypervolume_ratio_at_least_1"] == "1/2"
    assert lines["seeds_trials_per_hour_ratio"] == "3.00"  # 6 trials in 3600 s against 4 in 7200 s


def test_a_repeated_seed_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--seeds", "1", "1", "--trials", "2", "--startup-trials", "1"])
    assert "repeats a seed" in capsys.readouterr().err


def test_heretic_runs_in_float32_on_a_cpu_and_in_our_dtype_on_a_gpu():
    assert bench.default_heretic_dtype("cpu", "bfloat16") == "float32"
    assert bench.default_heretic_dtype("cuda", "bfloat16") == "bfloat16"


def test_a_run_names_the_cpu_and_whether_it_has_amx(monkeypatch):
    """The trial-rate ratio depends on the machine (on a CPU, on AMX above all): each run prints it."""
    monkeypatch.setattr("pipeline.runtime.cpu_info", lambda: ("Some Xeon", ["avx512f", "amx_bf16"]))
    assert bench.device_description("cpu").startswith("Some Xeon,") and "with AMX" in bench.device_description("cpu")
    monkeypatch.setattr("pipeline.runtime.cpu_info", lambda: ("Some EPYC", ["avx2"]))
    assert "without AMX" in bench.device_description("cpu")
