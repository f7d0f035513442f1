"""Code that can never run: a statement after return/raise/continue/break in the same block (a check
stranded after a `return` once let `--scheduler ashaa` run ASHA). Ruff's rule for it is preview-only."""
from __future__ import annotations

import ast

from tests.conftest import REPO

ENDS = (ast.Return, ast.Raise, ast.Continue, ast.Break)


def unreachable(tree: ast.AST) -> list[int]:
    """Line numbers of statements that follow a return/raise/continue/break in their block."""
    lines = []
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody", "handlers"):
            block = getattr(node, name, None)
            if not isinstance(block, list):
                continue
            for first, then in zip(block, block[1:]):
                if isinstance(first, ENDS) and isinstance(then, ast.stmt):
                    lines.append(then.lineno)
    return lines


def test_the_check_finds_a_stranded_statement():
    code = "def f(x):\n    return x\n    if x < 0:\n        raise ValueError(x)\n"
    assert unreachable(ast.parse(code)) == [3]
    assert unreachable(ast.parse("def f(x):\n    if x:\n        return 1\n    return 2\n")) == []


def test_no_code_after_return_or_raise():
    found = []
    for path in sorted(REPO.rglob("*.py")):
        if ".venv" in path.parts or "node_modules" in path.parts:
            continue
        for line in unreachable(ast.parse(path.read_text(), str(path))):
            found.append(f"{path.relative_to(REPO)}:{line}")
    assert not found, f"statements that can never run: {found}"
