"""Through the CLIs: two searches started at once on one machine, in a storage folder whose name
holds %20, a space, ?, #, braces and non-ASCII; the same command run again without --resume; a
killed experiment moved elsewhere, resumed, analyzed and warm-started from there, nothing written
at its old place."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

import analyze
import run_search
from analysis.experiment import load_trials, read_settings
from analysis.study import STUDY_NAME, study_url
from tests.conftest import REPO, run_cli, wait_until_still

QUICK = ["--space", "tiny", "--subset", 2, "--num-samples", 2, "--gpus", 0, "--no-pretrained",
         "--backbones", "tf_efficientnet_lite0", "--set", "input_size=32", "--scheduler", "fifo",
         "--warm-start", "none"]
KILLED, EPOCHS = "e 1%", 4  # killed after its first epoch, resumed from elsewhere


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def searches(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("two")
    storage = root / "a%20b ü?#{x}"
    args = {KILLED: [*QUICK, "--max-epochs", EPOCHS, "--max-concurrent", 1, "--name", KILLED],
            "other": [*QUICK, "--max-epochs", 2, "--name", "other"]}
    procs = {name: subprocess.Popen([sys.executable, "run_search.py", *map(str, a), "--data-dir", data_dir,
                                     "--storage-path", storage], cwd=REPO, text=True, start_new_session=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, a in args.items()}  # started together: both start a local Ray at once
    killed = procs[KILLED]
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        if any(r["epoch"] >= 1 for t in load_trials(storage / KILLED) for r in t.results):
            break
        time.sleep(0.2)
    if killed.poll() is None:
        os.killpg(killed.pid, signal.SIGKILL)  # the driver and its local Ray, like a crash
    out = {name: (p.wait(timeout=600), p.communicate()[0]) for name, p in procs.items()}
    wait_until_still(storage / KILLED)
    return root, storage, args, out


def test_two_searches_at_once_both_run(searches):
    _, storage, _, out = searches
    code, log = out["other"]
    assert code == 0, log[-3000:]
    assert len(load_trials(storage / "other")) == 2
    assert out[KILLED][0] == -signal.SIGKILL, out[KILLED][1][-3000:]  # it ran until it was killed
    assert load_trials(storage / KILLED)[0].epochs_run >= 1


def test_the_same_command_again_is_refused(searches, capsys):
    _, storage, args, _ = searches
    before = _snapshot(storage)
    code = run_search.main([*map(str, args["other"]), "--storage-path", str(storage), "--data-dir", "unused"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "already holds a search" in lines[0] and "--resume --name other" in lines[0] and "fresh --name" in lines[0]
    assert _snapshot(storage) == before  # the first search's folder untouched


def test_a_moved_experiment_resumes_analyzes_and_warm_starts_from_its_new_place(searches, capsys):
    root, storage, _, _ = searches
    new_storage = root / "moved place"
    new_storage.mkdir()
    exp = new_storage / "renamed ü"
    (storage / KILLED).rename(exp)
    old = _snapshot(storage)
    proc = run_cli("run_search.py", "--resume", "--name", exp.name, "--storage-path", new_storage, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    trials = load_trials(exp)
    assert len(trials) == 2 and all(t.epochs_run == EPOCHS for t in trials), [t.epochs_run for t in trials]
    study = optuna.load_study(study_name=STUDY_NAME, storage=study_url(exp))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2  # the resumed searcher told the study where it is now
    assert analyze.main([str(exp), "--no-retrain"]) == 0  # in this process (test_e2e runs analyze.py as one)
    assert (exp / "best_config.yaml").is_file()
    capsys.readouterr()
    from planning.define import warm_start
    from planning.settings import SearchSettings
    from spaces import Options, get_space
    space = get_space("tiny")
    settings = read_settings(exp)
    base = {k: settings[k] for k in ("seed", "compile", "precision")} | {"pretrained": False, "weights_dir": ""}
    points, told = warm_start(SearchSettings(warm_start=str(exp)), space, Options(space.backbones, EPOCHS), {}, base)
    assert len(told) == 2 and "told 2 finished trial(s)" in capsys.readouterr().out
    assert _snapshot(storage) == old and not (storage / KILLED).exists()  # nothing at the old place
