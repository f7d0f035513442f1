"""Every run_search.py option with a bad value stops before Ray starts with one `error:` line and
exit 2; --name must be one plain folder name (run in-process: Ray's start is replaced by a failure)."""
from __future__ import annotations

from pathlib import Path

import pytest

import run_search
from planning.settings import build_parser
from tests.fake_cifar import write_fake_cifar

# option -> a bad value (a callable gets the test's tmp_path); every option of the parser must be here
BAD = {
    "--gpus": "-1",
    "--gpus-per-trial": "0",
    "--cpus-per-trial": "0",
    "--max-concurrent": "-1",
    "--dashboard-host": "no-such-host.invalid",
    "--dashboard-port": "70000",
    "--space": "huge",
    "--backbones": "resnet9000",
    "--num-samples": "0",
    "--time-budget": "soon",
    "--warm-start": lambda t: str(t / "no-experiment"),
    "--max-epochs": "0",
    "--grace-period": "0",
    "--reduction-factor": "1",
    "--scheduler": "ashaa",
    "--sampler": "grid",
    "--screen": "sometimes",
    "--precision": "fp8",
    "--max-failures": "-1",
    "--seed": "-1",
    "--set": "colour=red",
    "--subset": "0",
    "--val-fraction": "1.5",
    "--storage-path": lambda t: str(_file(t) / "sub"),
    "--name": "../out",
    "--config": lambda t: str(t / "none.yaml"),
}
# options whose every value is taken, with why
NO_BAD_VALUE = {
    "--help": "prints the help",
    "--address": "any Ray address: ray.init reaches it or says why (tests/test_faults.py joins a cluster)",
    "--local-dir": "a folder for a cloud --storage-path's copy: checked there (tests/test_cloud_storage.py)",
    "--data-dir": "a folder or the archive: its checks are trainable/data.py's (tests/test_bad_input.py)",
    "--weights-dir": "checked where weights load (tests/test_bad_input.py weights-wrong-file)",
    # switches: present or not
    "--estimate": "", "--compile": "", "--no-pretrained": "", "--storage-shared": "", "--list-spaces": "",
    "--resume": "without --name: see test_resume_needs_a_name",
}


def _file(t: Path) -> Path:
    f = t / "a-file"
    f.write_text("")
    return f


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_fake_cifar(tmp_path_factory.mktemp("data"), train_per_class=3, test_per_class=1)


@pytest.fixture
def cli(monkeypatch, capsys, tiny_data, tmp_path):
    """run_search.py's main with a Ray that must not start; returns (exit code, stderr lines)."""
    import search.run

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the bad value was refused")
    monkeypatch.setattr(search.run, "start_ray", no_ray)

    def run(*args: str) -> tuple[int, list[str]]:
        base = ["--space", "tiny", "--no-pretrained", "--data-dir", str(tiny_data),
                "--storage-path", str(tmp_path / "runs"), "--gpus", "0"]
        try:
            code = run_search.main([*base, *args])
        except SystemExit as e:  # argparse
            code = e.code
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        return code, err
    return run


def test_every_option_is_listed():
    flags = {s for a in build_parser("")._actions for s in a.option_strings if s.startswith("--")}
    assert flags == set(BAD) | set(NO_BAD_VALUE), "a new option needs a bad value here (or a reason it has none)"


@pytest.mark.parametrize("flag", sorted(BAD))
def test_a_bad_value_is_one_error_line(flag, cli, tmp_path):
    value = BAD[flag](tmp_path) if callable(BAD[flag]) else BAD[flag]
    code, err = cli(f"{flag}={value}")
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert flag in err[0] or value.split("=")[0] in err[0], err  # names what is wrong
    assert not any((tmp_path / "runs").glob("*"))  # no experiment folder begun


def test_the_stranded_scheduler_check(cli):
    code, err = cli("--scheduler", "ashaa")
    assert code == 2 and err == ["error: argument --scheduler: invalid choice: 'ashaa' (choose from 'asha', 'fifo') "
                                 "(see --help)"]


def test_config_values_are_checked_like_flags(cli, tmp_path):
    for text in ("scheduler: ashaa\n", "num_samples: 0\n", "val_fraction: 0\n", "name: a/b\n"):
        (tmp_path / "c.yaml").write_text(text)
        code, err = cli("--config", str(tmp_path / "c.yaml"))
        assert code == 2 and len(err) == 1 and err[0].startswith("error: --"), (text, err)


def test_resume_needs_a_name(cli):
    code, err = cli("--resume")
    assert code == 2 and err == ["error: --resume needs --name of the experiment to continue"]


@pytest.mark.parametrize("name", ["../out", "a/b", "a\\b", "..", ".", "/abs", "-x", "a\x00b", "tab\tname",
                                  " padded", "x" * 256, "é" * 128])
def test_a_name_that_is_not_one_folder_is_refused(name, cli, tmp_path):
    code, err = cli("--name", name) if not name.startswith("-") else cli(f"--name={name}")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --name"), err
    assert not (tmp_path / "out").exists() and not any((tmp_path / "runs").glob("*"))


@pytest.mark.parametrize("name", ["a b", "100%", "a%20b", "q?x", "#1", "{n}", "ünï", "日本", "x" * 255])
def test_any_plain_folder_name_is_taken(name):
    from planning.settings import folder_name_problem
    assert folder_name_problem(name) == ""


def test_a_warm_start_folder_whose_name_holds_a_comma_is_one_folder(tmp_path):
    from planning.define import warm_start
    from planning.settings import SearchSettings
    from spaces import Options, get_space
    from trainable.errors import UserError
    folder = tmp_path / "runs, old"
    folder.mkdir()
    space = get_space("tiny")
    with pytest.raises(UserError, match="runs, old: not an experiment folder"):
        warm_start(SearchSettings(warm_start=str(folder)), space, Options(space.backbones, 2), {}, {})


def test_the_seed_range_is_printed_as_an_integer(cli):
    code, err = cli("--seed=-1")
    assert code == 2 and err[0].endswith("must be 0..2147483647"), err  # was "0..2.14748e+09"
