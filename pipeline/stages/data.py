"""Stage ``data``: harmful and harmless instructions, split into train / val / test, and the prompts of
any extra evaluation sets (``eval.sets``, in ``artifacts/sets/``).

A side (harmful or harmless) is either one ``pool`` that is shuffled (seeded) and cut into disjoint
splits of the configured sizes, or separate ``splits`` sources sampled independently (the paper's
own train/val files with JailbreakBench as test). Instructions are stripped; empty ones are an
error, exact duplicates are dropped with a count in the metrics.
"""

from __future__ import annotations

import logging
import random

from omegaconf import DictConfig

from pipeline import paths
from pipeline.cli import run_stage
from pipeline.conditions import check_set_name
from pipeline.data_sources import Record, load_source
from pipeline.errors import ConfigError, DataError
from pipeline.io import write_json

log = logging.getLogger(__name__)

SIDES = ("harmful", "harmless")
SPLITS = ("train", "val", "test")


def clean(records: list[Record], where: str) -> tuple[list[Record], int]:
    """Strip instructions, reject empty ones, drop exact duplicates; return records and duplicates dropped."""
    seen: set[str] = set()
    out = []
    for i, record in enumerate(records):
        text = record["instruction"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: instruction #{i} is empty or not text ({text!r})",
                            "remove empty rows from the source, or point `column` at the right field")
        text = text.strip()
        if text.lower() in seen:
            continue
        seen.add(text.lower())
        out.append({"instruction": text, "category": record.get("category")})
    return out, len(records) - len(out)


def split_pool(records: list[Record], sizes: DictConfig, seed: int, where: str) -> dict[str, list[Record]]:
    """Shuffle once and cut consecutive, disjoint train / val / test slices."""
    wanted = {s: sizes[s] for s in SPLITS}
    if any(v is None for v in wanted.values()):
        raise ConfigError(f"{where}: a pooled source needs explicit sizes for train, val and test",
                          "set data.<side>.sizes.{train,val,test} to numbers")
    if sum(wanted.values()) > len(records):
        raise DataError(f"{where}: sizes {wanted} need {sum(wanted.values())} instructions, the source has "
                        f"{len(records)} (after removing duplicates)", "lower data.<side>.sizes")
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    out, start = {}, 0
    for split in SPLITS:
        out[split] = shuffled[start : start + wanted[split]]
        start += wanted[split]
    return out


def sample(records: list[Record], size: int | None, seed: int, where: str) -> list[Record]:
    if size is None:
        return records
    if size > len(records):
        raise DataError(f"{where}: asked for {size} instructions, the source has {len(records)}",
                        "lower the split size in data.<side>.sizes")
    return random.Random(seed).sample(records, size)


def build_side(side: DictConfig, data: DictConfig, name: str) -> tuple[dict[str, list[Record]], int]:
    if "pool" in side and side.pool is not None:
        records, dropped = clean(load_source(side.pool, data), f"{name} pool")
        return split_pool(records, side.sizes, data.seed, name), dropped
    splits, dropped = {}, 0
    for split in SPLITS:
        records, n = clean(load_source(side.splits[split], data), f"{name} {split}")
        splits[split] = sample(records, side.sizes[split], data.seed, f"{name} {split}")
        dropped += n
    return splits, dropped


def build_set(name: str, spec: DictConfig, data: DictConfig, seen: set[str]) -> tuple[list[Record], int]:
    """An extra evaluation set (``eval.sets.<name>``): its source cleaned, prompts already in a train or val
    split dropped (the direction was found and chosen on those), then ``n`` sampled with the data seed
    (``n: null`` keeps all). Returns the records and how many were dropped as seen."""
    check_set_name(name)
    if spec.get("side") not in SIDES or not spec.get("interventions"):
        raise ConfigError(f"eval.sets.{name} needs side (harmful or harmless) and a list of interventions",
                          "see conf/eval/set/*.yaml for the shape")
    records, _ = clean(load_source(spec.source, data), f"eval set {name}")
    kept = [r for r in records if r["instruction"].lower() not in seen]
    if spec.get("n") is not None and spec.n > len(kept):
        raise DataError(f"eval.sets.{name}.n={spec.n}, but the set has {len(kept)} prompts not used for "
                        "training or validation", f"lower eval.sets.{name}.n, or set it to null for all")
    return sample(kept, spec.get("n"), data.seed, f"eval set {name}"), len(records) - len(kept)


def run(cfg: DictConfig) -> None:
    summary: dict[str, int | dict] = {}
    seen: set[str] = set()
    for name in SIDES:
        splits, dropped = build_side(cfg.data[name], cfg.data, name)
        train_val = {r["instruction"].lower() for s in ("train", "val") for r in splits[s]}
        leaked = sum(r["instruction"].lower() in train_val for r in splits["test"])
        if leaked:
            log.warning("%s: %d test instructions also appear in train/val; dropping them from test", name, leaked)
            splits["test"] = [r for r in splits["test"] if r["instruction"].lower() not in train_val]
        for split, records in splits.items():
            if not records:
                raise DataError(f"{name} {split} split is empty", f"raise data.{name}.sizes.{split}")
            write_json(paths.split_file("data", name, split), records)
            summary[f"{name}_{split}"] = len(records)
        summary[f"{name}_duplicates_dropped"] = dropped
        summary[f"{name}_test_overlap_dropped"] = leaked
        seen |= train_val
    sets = {}
    for name, spec in cfg.eval.sets.items():
        records, overlap = build_set(name, spec, cfg.data, seen)
        write_json(paths.eval_set(name), records)
        sets[name] = {"side": spec.side, "n": len(records), "train_val_overlap_dropped": overlap}
    write_json(paths.eval_set("index"), sets)  # always written: the folder is a DVC output even with no sets
    summary["sets"] = sets
    write_json(paths.metrics("data"), summary)
    log.info("splits: %s", summary)


def main() -> None:
    run_stage("data", run)


if __name__ == "__main__":
    main()
