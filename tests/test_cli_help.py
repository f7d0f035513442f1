"""What a newcomer meets first: the install `make search` does, the spaces listed, and each CLI's
--help with example commands that run as printed."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO, run_cli
from tests.printed import check_command, parser_of
from trainable.errors import UserError


def _make_dry_run(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("no make here")
    proc = subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("target", ["search", "app", "gpu-check", "duel", "bench"])
def test_running_the_product_installs_no_test_tools(target):
    """-B: as on a fresh clone, every step the target would take."""
    steps = _make_dry_run(target)
    assert re.search(r"pip install .*-e \.( |$)", steps, flags=re.M), steps
    assert "[test]" not in steps


def test_make_test_installs_the_test_extra():
    assert '-e ".[test]"' in _make_dry_run("test")


def test_the_faults_space_is_not_listed_but_still_runs():
    from search.run import list_spaces
    from spaces import get_space
    listed = [line.split()[0] for line in list_spaces().splitlines()]
    assert "faults" not in listed and {"default", "cpu", "tiny"} <= set(listed)
    assert get_space("faults").name == "faults"  # the fault tests' --space faults
    with pytest.raises(UserError) as e:
        get_space("nope")
    assert "faults" not in str(e.value)


@pytest.mark.parametrize("script", ["run_search.py", "analyze.py", "predict.py"])
def test_help_shows_examples_that_run_as_printed(script, capsys):
    with pytest.raises(SystemExit) as done:
        parser_of(script)(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text
    commands = [ln.strip() for ln in text.split("examples:", 1)[1].splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert commands
    for cmd in commands:
        assert check_command(cmd)[1] == script


def test_predict_help_shows_the_default_of_top(capsys):
    with pytest.raises(SystemExit):
        parser_of("predict.py")(["--help"])
    assert re.search(r"--top TOP\s+how many classes to show per image \(default: 5\)", capsys.readouterr().out)


def test_list_spaces_through_the_cli():
    proc = run_cli("run_search.py", "--list-spaces", check=True, timeout=120)
    assert "tiny" in proc.stdout and "faults" not in proc.stdout
