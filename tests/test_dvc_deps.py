"""``dvc.yaml`` names every file and every parameter a stage's result depends on, so no cached result goes stale.

DVC (and the sweep's stage fingerprint, which reads the same lists) re-runs a stage only when a declared
dependency changes. These tests compute what each stage actually uses and fail when ``dvc.yaml`` misses it:

* code: the stage module's import closure inside ``pipeline/`` (every ``pipeline`` module it imports,
  transitively). Parent packages that Python runs only on the way in (``pipeline/__init__.py``, ...) are
  exempt when they hold nothing but a docstring, constants and imports (checked too).
* params: every attribute chain on the composed config (``cfg.eval.loss.batch_size``) in the modules of
  that closure. By convention ``cfg`` always names the whole config: a function that takes one group
  names it for the group (``model_cfg``, ``select_cfg``), so its reads are counted where it is called.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = {name: spec for name, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}


def module_file(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


@cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(path: Path) -> set[str]:
    """``pipeline`` modules a file imports (``from pipeline.x import y`` counts ``pipeline.x.y`` if a module)."""
    found = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return found


def closure(module: str) -> set[Path]:
    """Files of ``module`` and every ``pipeline`` module it imports, transitively (explicit imports only)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path))
    return seen


def passive_package(path: Path) -> bool:
    """An ``__init__.py`` with only a docstring, constant assignments and imports: running it decides nothing."""
    for node in parsed(path).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Assign) and all(isinstance(n, ast.Constant) for n in ast.walk(node.value)
                                                if not isinstance(n, (ast.Tuple, ast.List, ast.Load))):
            continue
        return False
    return True


def parent_packages(module: str) -> set[Path]:
    parts = module.split(".")
    return {p for i in range(1, len(parts)) if (p := module_file(".".join(parts[:i]))) is not None}


def config_reads(path: Path) -> set[str]:
    """Dotted keys read as ``cfg.a.b...`` (outermost chain of each expression) in a file."""
    reads, inner = set(), set()
    for node in ast.walk(parsed(path)):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        chain, cur = [], node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            inner.add(id(cur))
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id == "cfg":
            keys = [k for k in reversed(chain) if k not in ("get", "items", "keys", "values")]
            if keys:
                reads.add(".".join(keys))
    return reads


def stage_module(spec: dict) -> str:
    return spec["cmd"].split("python -m ", 1)[1].split()[0]


def declared(dep: str, deps: list[str]) -> bool:
    return any(dep == d or dep.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_yaml_names_every_module_a_stage_imports(stage):
    spec = STAGES[stage]
    module = stage_module(spec)
    files = closure(module)
    exempt = {p for p in parent_packages(module) | {f for f in files if f.name == "__init__.py"} if passive_package(p)}
    missing = sorted(str(f.relative_to(ROOT)) for f in files - exempt
                     if not declared(str(f.relative_to(ROOT)), spec.get("deps", [])))
    assert not missing, f"dvc.yaml stage {stage} imports {missing} without naming them in its deps"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_yaml_names_every_param_a_stage_reads(stage):
    spec = STAGES[stage]
    params = [p for p in spec.get("params", []) if isinstance(p, str)]
    reads = set().union(*(config_reads(f) for f in closure(stage_module(spec))))
    missing = sorted(key for key in reads if not any(key == p or key.startswith(p + ".") for p in params))
    assert not missing, f"dvc.yaml stage {stage} reads params {missing} without naming them"


def test_the_dependency_checks_can_fail():
    """The closure sees through library modules, and a missing dependency is reported."""
    files = {str(f.relative_to(ROOT)) for f in closure("pipeline.stages.completions")}
    assert {"pipeline/interventions.py", "pipeline/hooks.py", "pipeline/models/loading.py",
            "pipeline/fetch.py"} <= files
    assert not declared("pipeline/hooks.py", ["pipeline/models", "pipeline/hook.py"])
    reads = config_reads(ROOT / "pipeline" / "stages" / "loss.py")
    assert "eval.loss" in reads and "model" in reads
