"""Where a run came from: git commit, DVC stage hashes, and what must never be logged (secrets).

Read cheaply from files, never by calling ``dvc`` (a stage runs while ``dvc repro`` holds the
repository lock): ``dvc.lock`` records, per stage, the md5 of every dependency and output of the
last run DVC completed. A stage whose small file outputs (its timing JSON at least) no longer match
those md5s was re-run outside DVC since, and is reported as not ``current``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

LOCK_FILE = Path("dvc.lock")
# Outputs this small are re-hashed to check the lock still describes the workspace.
CHECK_BYTES = 16 << 20
# Environment variables and config keys that hold credentials: WANDB_API_KEY, HF_TOKEN, *_SECRET...
SECRET_NAME = re.compile(r"(^|[_.-])(api[_-]?key|token|secret|password|passwd|credentials?)$", re.IGNORECASE)
REDACTED = "<redacted>"


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_lock(path: Path = LOCK_FILE) -> dict[str, Any]:
    """The ``stages`` mapping of ``dvc.lock`` (empty if there is none yet)."""
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) if path.exists() else {}


def _current(outs: list[dict]) -> bool | None:
    """Whether the small file outputs in the workspace still have the md5 the lock recorded."""
    checked = [o for o in outs
               if not str(o.get("md5", "")).endswith(".dir") and o.get("size", 0) <= CHECK_BYTES]
    if not checked:
        return None
    return all(Path(o["path"]).is_file() and _md5(Path(o["path"])) == o.get("md5") for o in checked)


def dvc_state(path: Path = LOCK_FILE) -> dict[str, Any]:
    """Per stage: a short hash of its lock entry (cmd, deps, params, outs), its outputs' md5s, freshness."""
    stages = {}
    for name, entry in read_lock(path).items():
        canonical = json.dumps(entry, sort_keys=True, default=str).encode()
        outs = entry.get("outs", [])
        stages[name] = {
            "hash": hashlib.sha256(canonical).hexdigest()[:16],
            "outs": {o["path"]: o.get("md5") for o in outs},
            "current": _current(outs),
        }
    return {"lock": path.exists(), "experiment": os.environ.get("DVC_EXP_NAME"), "stages": stages}


def git_state(generated: set[str] = frozenset()) -> dict[str, Any]:
    """Commit and whether tracked files differ from it, ignoring ``generated`` paths (DVC outputs, params)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "modified": []}
    status = _git("status", "--porcelain=v1", "--untracked-files=no") or ""
    changed = [line[3:].split(" -> ")[-1] for line in status.splitlines() if line.strip()]
    modified = [p for p in changed if not any(p == g or p.startswith(g.rstrip("/") + "/") for g in generated)]
    return {"commit": commit.strip(), "dirty": bool(modified), "modified": modified}


def generated_paths(lock: dict[str, Any]) -> set[str]:
    """Paths written by the pipeline rather than by hand: every stage output, dvc.lock and params.yaml."""
    return {"dvc.lock", "params.yaml", *(o["path"] for e in lock.values() for o in e.get("outs", []))}


def secret_values(environ: dict[str, str] | None = None) -> set[str]:
    """Values of credential-like environment variables (long enough not to match by accident)."""
    environ = os.environ if environ is None else environ
    return {v for k, v in environ.items() if SECRET_NAME.search(k) and len(v) >= 8}


def redact(obj: Any, secrets: set[str] | None = None) -> Any:
    """A copy of ``obj`` with credential-like keys blanked and any secret value cut out of strings."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: REDACTED if SECRET_NAME.search(str(k)) and v else redact(v, secrets)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
    return obj
