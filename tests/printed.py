"""Commands the CLIs print, checked as a user would paste them into a shell in the project folder."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from tests.conftest import REPO


def parser_of(script: str):
    """The argument parser of one of the project's CLIs, as a function of argv."""
    if script == "run_search.py":
        from planning.settings import parse_settings
        return parse_settings
    if script == "analyze.py":
        from analyze import parse
        return parse
    if script == "predict.py":
        from predict import parse
        return parse
    raise AssertionError(f"not a CLI of the project: {script}")


def check_command(cmd: str) -> list[str]:
    """`cmd` as the shell would run it from the project folder: its program exists there and is
    executable, a script of the project is there and its CLI accepts every option, a console
    script (ray, tensorboard) accepts the subcommand. Returns its argv."""
    argv = shlex.split(cmd)
    exe = Path(argv[0]) if os.path.isabs(argv[0]) else REPO / argv[0]
    assert "/" in argv[0] and exe.is_file() and os.access(exe, os.X_OK), f"{argv[0]} does not run from {REPO}: {cmd}"
    if argv[1].endswith(".py"):
        assert (REPO / argv[1]).is_file(), cmd
        parser_of(Path(argv[1]).name)(argv[2:])  # SystemExit(2) on an option it does not take
    else:
        proc = subprocess.run([*argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{cmd} --help: {proc.stderr[-1000:]}"
    return argv


def printed_after(out: str, prefix: str) -> str:
    """The rest of the first output line that starts with `prefix` (the command it prints)."""
    line = next((ln for ln in out.splitlines() if ln.startswith(prefix)), None)
    assert line is not None, f"no line starting {prefix!r} in:\n{out[-3000:]}"
    return line[len(prefix):].strip()
