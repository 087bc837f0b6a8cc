"""Imports point one way (docs/architecture.md): cli and app -> planner -> cost_models -> hw_profiles;
planner/trace -> runtime/models; runtime -> xplan.layout / xplan.plan / hw_profiles. Function-local
imports count: a cycle hidden inside a function is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder in the repository -> the package it installs as (pyproject's package-dir).
PACKAGES = {"xplan": "xplan", "planner": "xplan.planner", "runtime": "xplan.runtime",
            "cost_models": "xplan.cost_models", "hw_profiles": "xplan.hw_profiles"}
UPPER = ("xplan.cli", "xplan.app")

# (modules under this prefix, may not import these prefixes)
RULES = [
    ("xplan.hw_profiles", ("xplan.planner", "xplan.cost_models", "xplan.runtime", *UPPER)),
    ("xplan.runtime.models", ("xplan.planner", "xplan.cost_models", *UPPER)),
    ("xplan.runtime", ("xplan.planner", "xplan.cost_models", *UPPER)),
    ("xplan.cost_models", ("xplan.runtime", "xplan.planner", *UPPER)),
    ("xplan.planner", UPPER),
    ("xplan.layout", ("xplan.planner", "xplan.cost_models", "xplan.runtime", "xplan.hw_profiles", *UPPER)),
    ("xplan.layout_values", ("xplan.planner", "xplan.cost_models", "xplan.runtime", "xplan.hw_profiles", *UPPER)),
    ("xplan.plan", ("xplan.planner", "xplan.cost_models", "xplan.runtime", *UPPER)),
    ("xplan.errors", ("xplan.planner", "xplan.cost_models", "xplan.runtime", "xplan.hw_profiles", *UPPER)),
    ("xplan.processes", ("xplan.planner", "xplan.cost_models", "xplan.runtime", "xplan.hw_profiles", *UPPER)),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports anywhere in its body, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return out


def source_files() -> list[Path]:
    return sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py"))


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    name = module_name(path)
    imports = imported_modules(path)
    for prefix, forbidden in RULES:
        if not _under(name, prefix):
            continue
        bad = sorted(m for m in imports for f in forbidden if _under(m, f))
        assert not bad, f"{name} imports {', '.join(bad)}, which sits above it"


def test_the_rules_see_the_packages():
    names = {module_name(p) for p in source_files()}
    for prefix, _ in RULES:
        assert any(_under(n, prefix) for n in names), prefix
    assert "xplan.runtime.train.loop" in names and "xplan.hw_profiles.loader" in names
