"""Instruction sources and splits: formats, pinning, seeded disjoint splits, and clear errors."""

import json
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.data_sources import load_source, read_records
from pipeline.errors import DataError, IntegrityError
from pipeline.io import sha256_file
from pipeline.stages.data import clean, split_pool

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "refusal_direction"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _records(n):
    return [{"instruction": f"instruction number {i}", "category": None} for i in range(n)]


def test_pool_splits_are_disjoint_seeded_and_sized():
    sizes = OmegaConf.create({"train": 5, "val": 3, "test": 4})
    a = split_pool(_records(20), sizes, seed=42, where="t")
    b = split_pool(_records(20), sizes, seed=42, where="t")
    c = split_pool(_records(20), sizes, seed=7, where="t")
    assert {k: len(v) for k, v in a.items()} == {"train": 5, "val": 3, "test": 4}
    texts = [r["instruction"] for split in a.values() for r in split]
    assert len(set(texts)) == 12
    assert a == b and a != c


def test_splits_larger_than_the_data_are_an_error():
    with pytest.raises(DataError, match="lower data"):
        split_pool(_records(5), OmegaConf.create({"train": 3, "val": 2, "test": 2}), seed=0, where="harmful")


def test_clean_strips_drops_duplicates_and_rejects_empty():
    records, dropped = clean([{"instruction": " a "}, {"instruction": "A"}, {"instruction": "b"}], "src")
    assert [r["instruction"] for r in records] == ["a", "b"] and dropped == 1
    with pytest.raises(DataError, match="#1 is empty"):
        clean([{"instruction": "a"}, {"instruction": "  "}], "src")


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "txt"])
def test_local_formats(tmp_path, fmt):
    rows = [{"instruction": "Write a poem.", "category": "x"}, {"instruction": "Add 2 and 3.", "category": "y"}]
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "csv":
        path.write_text("instruction,category\nWrite a poem.,x\nAdd 2 and 3.,y\n")
    else:
        path.write_text("Write a poem.\nAdd 2 and 3.\n")
    got = read_records(path)
    assert [r["instruction"] for r in got] == ["Write a poem.", "Add 2 and 3."]


def test_missing_instruction_field_names_the_fields(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "hi"}]))
    with pytest.raises(DataError, match=r"no field 'instruction' \(fields: \['prompt'\]\)"):
        read_records(path)
    assert read_records(path, column="prompt", category_column=None)[0]["instruction"] == "hi"


def test_invalid_json_is_a_clear_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_records(path)


def _fake_wheel(cache: Path, member: str, content: bytes) -> None:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels / "fakepkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr(member, content)


def test_wheel_source_is_verified_by_sha256(tmp_path):
    _fake_wheel(tmp_path / "cache", "fakepkg/data/prompts.txt", b"Do a thing.\nDo another thing.\n")
    good = sha256_file_bytes(b"Do a thing.\nDo another thing.\n")
    source = OmegaConf.create({"type": "wheel", "package": "fakepkg", "version": "1.0",
                               "member": "fakepkg/data/prompts.txt", "sha256": good, "format": "txt"})
    assert len(load_source(source, OmegaConf.create({}))) == 2
    source.sha256 = "0" * 64
    with pytest.raises(IntegrityError, match="sha256"):
        load_source(source, OmegaConf.create({}))


def sha256_file_bytes(content: bytes) -> str:
    import hashlib

    return hashlib.sha256(content).hexdigest()


def test_paper_source_reads_a_local_mirror_and_checks_it(tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "splits").mkdir(parents=True)
    path = mirror / "splits" / "harmful_val.json"
    path.write_text(json.dumps([{"instruction": "x", "category": "c"}]))
    data = OmegaConf.create({"paper": {"revision": "abc", "mirror": str(mirror)}})
    source = OmegaConf.create({"type": "paper", "file": "splits/harmful_val.json", "sha256": sha256_file(path)})
    assert load_source(source, data) == [{"instruction": "x", "category": "c"}]
    source.sha256 = "1" * 64
    with pytest.raises(IntegrityError):
        load_source(source, data)


@pytest.mark.skipif(not SHARED.exists(), reason="the paper's sets are not mirrored on this machine")
def test_paper_config_matches_the_shared_mirror():
    from pipeline.config import compose_config

    cfg = compose_config(["data=paper", f"data.paper.mirror={SHARED}"])
    for side in ("harmful", "harmless"):
        for split in ("train", "val", "test"):
            records = load_source(cfg.data[side].splits[split], cfg.data)
            assert records and all(r["instruction"] for r in records)


@pytest.mark.skipif(not SHARED.exists(), reason="the paper's sets are not mirrored on this machine")
def test_strongreject_data_gives_every_split_the_same_harm_categories():
    """`data=strongreject` exists for per-category directions: each of its 6 categories has enough train
    prompts for its own difference in means (categories.min_prompts) and test prompts to ablate it on."""
    from collections import Counter

    from pipeline.config import compose_config
    from pipeline.stages.data import build_side

    cfg = compose_config(["data=strongreject", f"data.paper.mirror={SHARED}"])
    splits, _ = build_side(cfg.data.harmful, cfg.data, "harmful")
    counts = {split: Counter(r["category"] for r in records) for split, records in splits.items()}
    assert len(counts["train"]) == 6 and set(counts["train"]) == set(counts["val"]) == set(counts["test"])
    assert min(counts["train"].values()) >= cfg.categories.min_prompts
    assert min(counts["test"].values()) >= 10
    train = {r["instruction"] for r in splits["train"]}
    assert not train & {r["instruction"] for r in splits["test"]}
