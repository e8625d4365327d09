"""Resumable progress for long stages (selection, generation), and finished conditions a rerun reuses.

DVC deletes a stage's declared outputs before re-running it, so partial results live elsewhere:
``artifacts/checkpoints/<stage>/<fingerprint>/``. The fingerprint hashes everything the results
depend on (the parameters ``dvc.yaml`` lists for the stage and the stage's input files), so a checkpoint
is reused by a rerun of the same computation, even after a change to parameters the stage does not read
(a killed ``select`` keeps its scores when only ``export`` settings changed); others are deleted when the
stage starts, and the stage deletes its own once its outputs are written. Values are small JSON documents
written atomically, so a kill at any moment leaves only whole entries behind.

The evaluation stages evaluate several conditions, and DVC re-runs all of them when one is added (a
compared edit, ``eval.compared``, say). Their checkpoints are ``kept``: a successful run leaves its
entries, each condition's scoped by a digest of what that condition alone reads (its edit record, its
prompts; ``scope``) or keyed by its content, so a rerun computes only what changed. A kept checkpoint's
fingerprint also hashes the pipeline's code (a rerun after a code change starts afresh) and leaves out
``eval.compared``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline import paths
from pipeline.config import stage_params
from pipeline.io import read_json, sha256_file, write_text


class Checkpoint:
    def __init__(self, root: Path, namespace: str = "") -> None:
        self.root = root
        self.namespace = namespace

    @classmethod
    def open(cls, stage: str, cfg: DictConfig, inputs: Iterable[Path], kept: bool = False) -> Checkpoint:
        """The checkpoint of ``stage`` for this config and these input files (stale ones removed); ``kept``
        for one whose entries outlive a successful run (module docstring)."""
        params = stage_params(stage, cfg)
        if kept:
            params = {key: value for key, value in params.items() if key != "eval.compared"}
        digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
        digest.update(files_digest(inputs).encode())
        if kept:
            digest.update(code_digest().encode())
        stage_dir = paths.ARTIFACTS / "checkpoints" / stage
        fingerprint = digest.hexdigest()[:16]
        if stage_dir.exists():
            for old in stage_dir.iterdir():
                if old.name != fingerprint:
                    shutil.rmtree(old)
        return cls(stage_dir / fingerprint)

    def scope(self, name: str, version: str = "") -> Checkpoint:
        """A view whose keys are prefixed with ``name`` (e.g. one generation condition) and ``version`` (a
        digest of what only that part reads: its edit record, its prompts), so its entries serve no other."""
        return Checkpoint(self.root, f"{self.namespace}{name}{'#' + version if version else ''}/")

    def _path(self, key: str) -> Path:
        safe = hashlib.sha256(f"{self.namespace}{key}".encode()).hexdigest()[:24]
        return self.root / f"{safe}.json"

    def get(self, key: str) -> Any | None:
        path = self._path(key)
        return read_json(path)["value"] if path.exists() else None

    def put(self, key: str, value: Any) -> None:
        # NaN is a legitimate score (the selection filters it), so it is allowed here, unlike in metrics
        write_text(self._path(key), json.dumps({"key": f"{self.namespace}{key}", "value": value}))

    def values(self) -> Iterator[Any]:
        """Every value stored under this view's keys (for entries keyed by their content)."""
        if self.root.exists():
            for path in sorted(self.root.glob("*.json")):
                entry = read_json(path)
                if entry["key"].startswith(self.namespace):
                    yield entry["value"]

    def count(self) -> int:
        return len(list(self.root.glob("*.json"))) if self.root.exists() else 0

    def clear(self) -> None:
        shutil.rmtree(self.root.parent, ignore_errors=True)


def files_digest(files: Iterable[Path], root: Path | None = None) -> str:
    """A hash of the files' names (relative to ``root``, if given) and contents."""
    digest = hashlib.sha256()
    for path in sorted(map(Path, files)):
        digest.update(f"{path.relative_to(root) if root else path}:{sha256_file(path)}".encode())
    return digest.hexdigest()[:16]


@cache
def code_digest() -> str:
    """A hash of every file of the ``pipeline`` package: entries kept across runs serve no other code."""
    package = Path(__file__).parent
    return files_digest((p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts), package)


def content_key(value: Any) -> str:
    """A key naming a JSON-able value by its content (prompts, a chunk of completions)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]
