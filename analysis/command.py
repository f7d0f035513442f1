"""The commands the CLIs print for the user to paste, so each runs as printed: the running interpreter
(a plain `python` outside the venv has no torch), console scripts from beside it (not on PATH unless
the venv is activated), paths relative to the project folder when the user works from it."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]  # where run_search.py, analyze.py and predict.py live


def shown(path: str | Path) -> str:
    """`path` relative when the current folder is the project folder and the path lies inside it,
    else absolute. Symlinks are kept (.venv/bin/python is one)."""
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
    return shown(sys.executable)


def tool(name: str) -> str:
    """A console script beside the running interpreter (ray, tensorboard), else the bare name (on PATH)."""
    beside = Path(sys.executable).absolute().parent / name
    return shown(beside) if beside.exists() else name


def command(program: str, *args: str | Path) -> str:
    """One shell-quoted command line: `program` is a script of the project (run by this interpreter)
    or a console script of the venv; Path arguments are `shown`, strings go as given."""
    head = [python(), shown(PROJECT / program)] if program.endswith(".py") else [tool(program)]
    return shlex.join(head + [shown(a) if isinstance(a, Path) else str(a) for a in args])


def examples(*items: tuple[str, str]) -> str:
    """An argparse epilog: per (what it does, command) a comment line and the command."""
    return "examples:\n" + "\n".join(f"  # {what}\n  {cmd}" for what, cmd in items)
