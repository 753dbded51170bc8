"""Code conventions of ``lightning_privacy/`` that review alone would let slip.

* No function is longer than 60 lines of code (its docstring not counted).
* Every method of a Lightning callback, logger, module or data module that overrides a Lightning
  hook says so with ``@override``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers.logger import Logger

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_privacy"
MAX_FUNCTION_LINES = 60
LIGHTNING_BASES = {
    "Callback": L.Callback,
    "Logger": Logger,
    "LightningModule": L.LightningModule,
    "LightningDataModule": L.LightningDataModule,
    "ScheduledObserver": L.Callback,  # the package's own observer base
}


def _trees():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent), ast.parse(path.read_text())


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function from ``def`` to its last line, without its docstring."""
    lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
    first = node.body[0]
    docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if docstring and isinstance(first.value.value, str):  # type: ignore[attr-defined]
        lines -= first.end_lineno - first.lineno + 1  # type: ignore[operator]
    return lines


def function_lengths() -> list[tuple[int, str]]:
    """``(code lines, "path:line name")`` of every function, longest first."""
    rows = [
        (code_lines(node), f"{path}:{node.lineno} {node.name}")
        for path, tree in _trees()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    return sorted(rows, reverse=True)


def missing_overrides() -> list[str]:
    """Methods that override a Lightning hook without ``@override``."""
    missing = []
    for path, tree in _trees():
        for cls in ast.walk(tree):
            if not isinstance(cls, ast.ClassDef):
                continue
            bases = [LIGHTNING_BASES.get(ast.unparse(b).split(".")[-1]) for b in cls.bases]
            hooks = {n for base in bases if base is not None for n in dir(base)}
            for fn in cls.body:
                if not isinstance(fn, ast.FunctionDef) or fn.name.startswith("__"):
                    continue
                decorators = {ast.unparse(d).split(".")[-1] for d in fn.decorator_list}
                if fn.name in hooks and "override" not in decorators:
                    missing.append(f"{path}:{fn.lineno} {cls.name}.{fn.name}")
    return missing


def test_no_function_over_60_lines():
    lengths = function_lengths()
    print("longest five:", *lengths[:5], sep="\n  ")
    assert [row for row in lengths if row[0] > MAX_FUNCTION_LINES] == []


def test_every_overridden_lightning_hook_says_override():
    assert missing_overrides() == []


def test_the_length_check_counts_code_not_docstrings():
    tree = ast.parse(
        "def f():\n    '''Doc.\n\n    More.\n    '''\n" + "    x = 1\n" * 61 + "    return x\n"
    )
    assert code_lines(tree.body[0]) == 63  # def, 61 assignments, return; docstring not counted
