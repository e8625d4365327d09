"""What ``make run`` is about to do, and roughly how long it will take on this machine.

``python -m pipeline.plan`` (the first step of ``make run``) prints the stages ``dvc repro`` will run
(those DVC reports changed, and every stage downstream of them) and an estimate per stage:

* ``last run here``: the stage's own wall time in ``artifacts/timing`` from its previous run in this
  checkout (the same machine, possibly other settings);
* ``reference``: the wall time measured by a default run on a reference machine
  (``pipeline/data/reference_timings/<dtype>.json``: one per dtype, the run of a machine where
  ``model.dtype=auto`` chose it), scaled by how much faster or slower this CPU multiplies matrices at the
  model's shapes in that dtype. The matrix-multiply rate here is measured on the spot (half a second per
  dtype), and the reference is the one of the dtype this CPU uses: a CPU with AMX is compared with one
  with AMX, where decoding and small passes gain less from bfloat16 than large matrix multiplies do.

The forward passes dominate every model stage on a CPU, so this is right to within tens of percent
on a quiet machine; a machine that is busy with another job runs every stage slower.
``python -m pipeline.plan --record`` writes the reference of this checkout's last ``make run``'s dtype.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import networkx as nx
import torch

from pipeline import paths
from pipeline.config import load_params
from pipeline.errors import ConfigError
from pipeline.runtime import BF16_MARGIN, machine, measure_rates, model_shapes
from pipeline.stages import STAGES

log = logging.getLogger(__name__)

REFERENCES = Path(str(resources.files("pipeline.data") / "reference_timings"))


@dataclass(frozen=True)
class Estimate:
    stage: str
    seconds: float | None
    source: str


def stages_to_run(root: Path = Path(".")) -> list[str]:
    """Stages ``dvc repro`` would run (in ``pipeline.stages.STAGES`` order): changed ones and all that depend
    on them. ``dvc repro --dry`` cannot say: it stops at the first stage whose inputs do not exist yet."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        by_address = {stage.addressing: stage for stage in graph.nodes}
        changed = {by_address[address] for address in repo.status() if address in by_address}
        run = {stage.name for stage in set(changed).union(*(nx.ancestors(graph, s) for s in changed))}
    return [name for name in STAGES if name in run] + sorted(run - set(STAGES))


def dtype_in_use(requested: str, rates: dict[str, float]) -> str:
    """The dtype ``model.dtype`` resolves to on a CPU with these matmul ``rates`` (see pipeline.runtime)."""
    if requested != "auto":
        return requested
    return "bfloat16" if rates["bfloat16"] >= BF16_MARGIN * rates["float32"] else "float32"


def estimates(stages: list[str], reference: dict | None, here_rate: float | None,
              timing_dir: Path = paths.ARTIFACTS / "timing") -> list[Estimate]:
    """Each stage's expected wall time: its last run here, else the reference scaled to this CPU's rate."""
    out = []
    for stage in stages:
        last = timing_dir / f"{stage}.json"
        if last.exists():
            out.append(Estimate(stage, json.loads(last.read_text())["wall_seconds"], "last run here"))
        elif reference and here_rate and stage in reference["stages"]:
            factor = reference["rate_gflops"] / here_rate
            out.append(Estimate(stage, reference["stages"][stage] * factor,
                                f"reference x {factor:.2f} (matmul rate there / here)"))
        else:
            out.append(Estimate(stage, None, "no timing"))
    return out


def read_references(folder: Path = REFERENCES) -> dict[str, dict]:
    """The shipped references by dtype (``<dtype>.json``)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def for_dtype(references: dict[str, dict], dtype: str) -> dict | None:
    """The reference run in ``dtype``, else any (scaled by the matmul rate alone)."""
    return references.get(dtype) or next(iter(references.values()), None)


def here_rate(reference: dict, requested_dtype: str) -> tuple[str, float]:
    """This CPU's dtype and GFLOP/s at the reference's shapes (measured now, about a second)."""
    rates = measure_rates([tuple(shape) for shape in reference["shapes"]])
    dtype = dtype_in_use(requested_dtype, rates)
    return dtype, rates[dtype]


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def show_plan() -> None:
    cfg = load_params()
    stages = stages_to_run()
    if not stages:
        print("plan: every stage is up to date; dvc repro has nothing to run")
        return
    references = read_references()
    reference = next(iter(references.values()), None)
    rate = None
    if reference is None:
        print(f"plan: no reference timings shipped ({REFERENCES})")
    elif torch.cuda.is_available() and cfg.runtime.device != "cpu":
        print("plan: the reference timings are for a CPU; no estimate for a GPU run")
        reference = None
    elif reference["model"] != cfg.model.name:
        print(f"plan: the reference timings are for {reference['model']}, not {cfg.model.name}; "
              "stages without a timing here are not estimated")
        reference = None
    else:
        dtype, rate = here_rate(reference, cfg.model.dtype)  # every reference is of this model: the same shapes
        reference = for_dtype(references, dtype)
        print(f"plan: this CPU multiplies at {rate:.0f} GFLOP/s in {dtype} at the model's shapes; the reference "
              f"machine ({reference['machine']}) at {reference['rate_gflops']:.0f} GFLOP/s in {reference['dtype']}")
    rows = estimates(stages, reference, rate)
    print(f"plan: dvc repro will run {len(stages)} stages for {cfg.model.name}:")
    width = max(len(row.stage) for row in rows) if rows else 0
    for row in rows:
        print(f"  {row.stage:<{width}} {minutes(row.seconds) if row.seconds is not None else '?':>10}  ({row.source})")
    known = [row.seconds for row in rows if row.seconds is not None]
    if known:
        unknown = len(rows) - len(known)
        rest = f", plus {unknown} stages not estimated" if unknown else ""
        print(f"plan: about {minutes(sum(known))} in all{rest}")


def record(folder: Path = REFERENCES) -> None:
    """Write the reference of the last run's dtype from this checkout's last run: stage wall times, the
    model, its dtype and rate."""
    cfg = load_params()
    timings = {s: json.loads(paths.timing(s).read_text()) for s in STAGES if paths.timing(s).exists()}
    loaded = [t["models"][cfg.model.name] for t in timings.values() if cfg.model.name in t.get("models", {})]
    if not loaded or not loaded[0].get("rates"):
        raise ConfigError("no stage of the last run measured the model's matmul rate",
                          "run `make run` (model.dtype=auto, on a CPU) before --record")
    from pipeline.models.loading import text_config

    dtype, shapes = loaded[0]["dtype"], model_shapes(text_config(cfg.model))
    # measured now, as the plan measures a CPU, not the run's cached measurement: a host's speed drifts
    rates = measure_rates([tuple(shape) for shape in shapes])
    reference = {
        "machine": machine(),
        "model": cfg.model.name,
        "dtype": dtype,
        "rate_gflops": round(rates[dtype], 3),
        "shapes": shapes,
        "stages": {s: t["wall_seconds"] for s, t in timings.items()},
    }
    path = folder / f"{dtype}.json"
    path.write_text(json.dumps(reference, indent=2) + "\n")
    print(f"wrote {path}: {len(timings)} stages, {minutes(sum(reference['stages'].values()))} in all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="write the reference from the last run's timings")
    args = parser.parse_args()
    record() if args.record else show_plan()


if __name__ == "__main__":
    main()
