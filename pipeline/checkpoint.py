"""Resumable progress for long stages (selection, generation).

DVC deletes a stage's declared outputs before re-running it, so partial results live elsewhere:
``artifacts/checkpoints/<stage>/<fingerprint>/``. The fingerprint hashes everything the results
depend on (the parameters ``dvc.yaml`` lists for the stage and the stage's input files), so a checkpoint
is reused by a rerun of the same computation, even after a change to parameters the stage does not read
(a killed ``select`` keeps its scores when only ``export`` settings changed); others are deleted when the
stage starts, and the stage deletes its own once its outputs are written. Values are small JSON documents
written atomically, so a kill at any moment leaves only whole entries behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
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
    def open(cls, stage: str, cfg: DictConfig, inputs: Iterable[Path]) -> Checkpoint:
        """The checkpoint of ``stage`` for this config and these input files (stale ones removed)."""
        digest = hashlib.sha256(json.dumps(stage_params(stage, cfg), sort_keys=True, default=str).encode())
        for path in sorted(map(Path, inputs)):
            digest.update(f"{path}:{sha256_file(path)}".encode())
        stage_dir = paths.ARTIFACTS / "checkpoints" / stage
        fingerprint = digest.hexdigest()[:16]
        if stage_dir.exists():
            for old in stage_dir.iterdir():
                if old.name != fingerprint:
                    shutil.rmtree(old)
        return cls(stage_dir / fingerprint)

    def scope(self, name: str) -> Checkpoint:
        """A view whose keys are prefixed with ``name`` (e.g. one generation condition)."""
        return Checkpoint(self.root, f"{self.namespace}{name}/")

    def _path(self, key: str) -> Path:
        safe = hashlib.sha256(f"{self.namespace}{key}".encode()).hexdigest()[:24]
        return self.root / f"{safe}.json"

    def get(self, key: str) -> Any | None:
        path = self._path(key)
        return read_json(path)["value"] if path.exists() else None

    def put(self, key: str, value: Any) -> None:
        # NaN is a legitimate score (the selection filters it), so it is allowed here, unlike in metrics
        write_text(self._path(key), json.dumps({"key": f"{self.namespace}{key}", "value": value}))

    def count(self) -> int:
        return len(list(self.root.glob("*.json"))) if self.root.exists() else 0

    def clear(self) -> None:
        shutil.rmtree(self.root.parent, ignore_errors=True)
