"""The size rules of the code base, checked on every test run (issue "The house after six capabilities").

- no module in ``onnxq/`` or ``passes/`` over 600 lines;
- no function or method there over 80 lines (decorators and docstring included: the span a reader scrolls);
- no ``from module import _private`` across modules: a name another module needs is public.

Cyclomatic complexity (at most 15) and statement counts (at most 50 per function) are checked by ruff in CI
(``[tool.ruff.lint]`` in pyproject.toml, ``.ci/run``); ruff is a linter, not a test dependency of the suite.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    files = sorted([*(ROOT / "onnxq").rglob("*.py"), *(ROOT / "passes").rglob("*.py")])
    # onnxq/passes is a git-ignored link to passes/ (for mypy): read each file once, under passes/
    return [f for f in files if f.relative_to(ROOT).parts[:2] != ("onnxq", "passes")]


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _span(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
    return (fn.end_lineno or fn.lineno) - first + 1


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function in ``source`` longer than ``limit`` lines."""
    return [(fn.name, _span(fn)) for fn in _functions(ast.parse(source)) if _span(fn) > limit]


def private_imports(source: str) -> list[str]:
    """``module._name`` for every ``from module import _name`` of another module (relative imports included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found += [f"{'.' * node.level}{node.module + '.' if node.module else ''}{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
    return found


def test_the_scan_sees_the_whole_package() -> None:
    names = {f.relative_to(ROOT).as_posix() for f in _sources()}
    assert {"onnxq/cli.py", "passes/insert_qdq.py", "onnxq/calibration/runner.py", "onnxq/weightonly/gptq.py"} <= names
    assert not any(n.startswith("onnxq/passes/") for n in names)


def test_the_checks_catch_what_they_name() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def big():\n{body}\n") == [("big", MAX_FUNCTION_LINES + 1)]
    fits = "\n".join(body.splitlines()[: MAX_FUNCTION_LINES - 2])  # + the decorator and the def line: 80
    assert long_functions(f"@decorator\ndef fits():\n{fits}\n") == []
    assert private_imports("from onnxq.calibration.runner import _quiet, public\nfrom . import _x") == [
        "onnxq.calibration.runner._quiet", "._x"]  # fmt: skip
    assert private_imports("from __future__ import annotations\nimport onnxq._ort") == []


@pytest.mark.parametrize("path", _sources(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_module_size_rules(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    lines = source.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines (at most {MAX_MODULE_LINES}): split it"
    assert long_functions(source) == [], f"functions over {MAX_FUNCTION_LINES} lines in {path.name}"
    assert private_imports(source) == [], f"private names imported across modules in {path.name}"
