"""`dvc.yaml` lineage: every stage lists, as a dependency, every project module its step runs.

A stage whose code deps miss a module it imports is not rerun by `dvc repro` when that module
changes (a lineage bug). The imports are read statically (module-level and function-level
`import`s alike) from each step's module, transitively, within the project's packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("aliccp", "flows", "models", "serving", "tasks")
# The step function each stage's command (`esmm <stage>`) runs lives in tasks.steps, which
# binds it to the config; the modules below are where each step's work is done.
STAGE_ROOTS = {
    "ingest": ["tasks.steps", "tasks.ingest", "tasks.data"],
    "validate": ["tasks.steps", "tasks.validate"],
    "train": ["tasks.steps", "tasks.train"],
    "evaluate": ["tasks.steps", "tasks.evaluate"],
    "register": ["tasks.steps", "tasks.register"],
}
# tasks.steps imports every step module; a stage depends on its own step's closure, plus the
# binding file itself (listed as a file, not followed).
NOT_FOLLOWED = {"tasks.steps"}


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    if path.is_dir() and (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _imports(name: str) -> set[str]:
    """Project modules `name` imports anywhere in its source."""
    file = _module_file(name)
    tree = ast.parse(file.read_text(), filename=str(file))
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate.split(".")[0] in PACKAGES and _module_file(candidate):
                found.add(candidate)
                # importing a.b.c runs a/__init__.py and a/b/__init__.py too
                parts = candidate.split(".")
                found.update(
                    ".".join(parts[:i])
                    for i in range(1, len(parts))
                    if _module_file(".".join(parts[:i]))
                )
    return found


def _closure(roots: list[str]) -> set[Path]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in NOT_FOLLOWED:
            todo.extend(_imports(name))
    files = {_module_file(name) for name in seen}
    return {f.relative_to(REPO) for f in files if not _only_docstring(f)}


def _only_docstring(file: Path) -> bool:
    """A package's `__init__.py` that runs nothing (a docstring at most)."""
    body = ast.parse(file.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def _covered(file: Path, deps: list[str]) -> bool:
    return any(file == Path(dep) or Path(dep) in file.parents for dep in deps)


def _stage_deps() -> dict[str, list[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: [str(d) for d in stage.get("deps", [])] for name, stage in stages.items()}


@pytest.mark.parametrize("stage", sorted(STAGE_ROOTS))
def test_every_module_a_stage_runs_is_a_dependency(stage):
    deps = _stage_deps()[stage]
    missing = sorted(str(f) for f in _closure(STAGE_ROOTS[stage]) if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r} does not list {missing}"


def test_every_stage_is_checked():
    assert set(_stage_deps()) == set(STAGE_ROOTS)


def test_the_closure_follows_function_level_imports(tmp_path):
    """The checker itself: tasks.evaluate imports the input pipeline inside a function."""
    closure = _closure(["tasks.evaluate"])
    assert any(str(f).startswith("models/") for f in closure)
