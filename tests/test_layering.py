"""The folder tells the layer: the runtime never pulls in torch, transformers or optimum."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "optimum")


def test_importing_the_runtime_loads_no_torch_or_transformers():
    code = (
        "import sys, prefixkit.runtime\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Every module each file in `folder` imports, relative imports resolved inside prefixkit."""
    found = {}
    package = f"prefixkit.{folder.name}"
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    names.add(f"{package}.{node.module or ''}".rstrip("."))
                else:
                    names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("runtime", HEAVY + ("prefixkit.exporter", "prefixkit.training")),
        ("exporter", ("prefixkit.training",)),
        ("evaluation", HEAVY + ("prefixkit.exporter", "prefixkit.training.trainer", "prefixkit.training.modules")),
    ],
)
def test_no_file_imports_a_layer_above_it(folder, forbidden):
    offenders = {
        file: sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))
        for file, names in imported_modules(ROOT / folder).items()
    }
    assert {f: n for f, n in offenders.items() if n} == {}


def test_the_slow_tier_names_tests_that_exist():
    """conftest.SLOW marks tests by name for `make check` to leave out; a renamed test must not
    drop out of that list unnoticed (it would then run in the fast tier)."""
    from conftest import SLOW

    for module, names in SLOW.items():
        source = Path(__file__).parent / f"{module}.py"
        assert source.is_file(), module
        defined = {n.name for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.FunctionDef)}
        assert not (names or set()) - defined, (module, (names or set()) - defined)
