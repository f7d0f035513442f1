"""The commands the CLIs print for the user to paste, built in one place so each runs as printed.

A printed command names the interpreter that is running now (`.venv/bin/python` after `make search`:
a plain `python` outside the venv has no torch), a console script from beside it (`.venv/bin/ray`,
`.venv/bin/tensorboard`: not on PATH unless the venv is activated), and paths relative to the
project folder when the user works from it (else absolute, which run from anywhere).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]  # where run_search.py, analyze.py and predict.py live


def shown(path: str | Path) -> str:
    """`path` as a printed command names it: relative when the current folder is the project folder
    and the path lies inside it, else absolute. Symlinks are kept (.venv/bin/python is one)."""
    p = Path(path).expanduser().absolute()
    cwd = Path.cwd().absolute()
    if cwd.resolve() == PROJECT:
        for root in (cwd, PROJECT):  # the path may be spelled through either
            try:
                return str(p.relative_to(root))
            except ValueError:
                continue
    return str(p)


def python() -> str:
    """The interpreter running now, as a command names it."""
    return shown(sys.executable)


def tool(name: str) -> str:
    """A console script installed beside the running interpreter (ray, tensorboard), else the bare
    name (an interpreter without it: then it must be on PATH)."""
    beside = Path(sys.executable).absolute().parent / name
    return shown(beside) if beside.exists() else name


def command(program: str, *args: str | Path) -> str:
    """One shell-quoted command line: `program` is one of the project's scripts (`analyze.py`,
    `run_search.py`, `benchmarks/bench.py`: run by this interpreter) or a console script of the
    venv (`ray`, `tensorboard`). Path arguments are shown as `shown` does; strings go as given."""
    head = [python(), shown(PROJECT / program)] if program.endswith(".py") else [tool(program)]
    return shlex.join(head + [shown(a) if isinstance(a, Path) else str(a) for a in args])


def examples(*items: tuple[str, str]) -> str:
    """An argparse epilog: "examples:", then per (what it does, command) a comment line and the
    command (built by `command`, so the help shows what to paste here)."""
    return "examples:\n" + "\n".join(f"  # {what}\n  {cmd}" for what, cmd in items)
