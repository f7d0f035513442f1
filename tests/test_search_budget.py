"""Issue 10 through the CLI: the recipes are the first trials, a time budget ends the search and
--resume continues with what is left of it, --estimate exits without training."""
from __future__ import annotations

import json
import time

import pytest
import yaml

from analysis.experiment import load_trials
from search.budget import BUDGET_FILE
from spaces import Options, get_space
from spaces.warm_start import recipe_points
from tests.conftest import WEIGHTS, run_cli

BUDGET_S = 45


def _args(data_dir, storage, name):
    pretrained = (WEIGHTS / "tf_efficientnet_lite0.pth").is_file()
    return ["--gpus", "0", "--space", "cpu", "--backbones", "tf_efficientnet_lite0", "--max-epochs", 2,
            "--set", "input_size=32", "--subset", 5, "--data-dir", data_dir, "--storage-path", storage,
            "--name", name, "--max-concurrent", 1,
            *(["--weights-dir", WEIGHTS] if pretrained else ["--no-pretrained"])]


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory, data_dir):
    storage = tmp_path_factory.mktemp("runs")
    t0 = time.monotonic()
    proc = run_cli("run_search.py", *_args(data_dir, storage, "budget"), "--time-budget", f"{BUDGET_S}s",
                   env={"CIFAR_TUNE_CACHE": str(storage / "cache")}, check=True)
    return storage / "budget", proc, time.monotonic() - t0


def _points(exp):
    s = yaml.safe_load((exp / "search_settings.yaml").read_text())
    base = {"pretrained": not s["no_pretrained"], "weights_dir": s["weights_dir"], "seed": 0, "compile": False}
    space = get_space("cpu")
    return recipe_points(space, Options(("tf_efficientnet_lite0",), 2), base, {"input_size": "32"})[0]


def test_the_first_trials_are_the_recipe_points(budgeted):
    exp, proc, _ = budgeted
    trials = sorted(load_trials(exp), key=lambda t: min(r["timestamp"] for r in t.results) if t.results else 1e20)
    points = _points(exp)
    assert len(points) >= 4 and "warm start: " in proc.stdout
    started = [t for t in trials if t.results]
    assert started, proc.stdout[-2000:]
    n = min(len(started), len(points))
    assert [t.config for t in started[:n]] == [p.config for p in points[:n]]


def test_the_budget_ends_the_search_and_the_best_is_exported(budgeted):
    exp, proc, wall = budgeted
    spent = json.loads((exp / BUDGET_FILE).read_text())
    assert spent["budget_s"] == BUDGET_S and BUDGET_S <= spent["spent_s"] < BUDGET_S + 30
    assert (exp / "best_config.yaml").is_file() and "best: trial" in proc.stdout
    assert "cost estimate" in proc.stdout and "time budget" in proc.stdout  # printed before launch
    assert (exp / "estimate.json").is_file()
    for t in load_trials(exp):  # stopped cleanly: every reported epoch is a whole epoch with a score
        assert all(r.get("status", "ok") == "ok" for r in t.results)


def test_resume_gets_only_what_is_left_of_the_budget(budgeted, data_dir):
    exp, _, _ = budgeted
    before = {t.trial_id: t.epochs_run for t in load_trials(exp)}
    t0 = time.monotonic()
    proc = run_cli("run_search.py", *_args(data_dir, exp.parent, "budget"), "--resume")
    after = {t.trial_id: t.epochs_run for t in load_trials(exp)}
    assert after == before, proc.stdout[-3000:]  # nothing left to spend: no new trial, no new epoch
    assert proc.returncode == 2 and "has spent its --time-budget of 45s" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60  # said before Ray starts


def test_estimate_exits_without_training(tmp_path, data_dir):
    proc = run_cli("run_search.py", *_args(data_dir, tmp_path, "est"), "--estimate", "--num-samples", 8,
                   env={"CIFAR_TUNE_CACHE": str(tmp_path / "cache")}, check=True)
    assert "cost estimate" in proc.stdout and "8 trials: at most" in proc.stdout
    assert "tf_efficientnet_lite0@32" in proc.stdout
    assert not (tmp_path / "est").exists()  # no experiment, no Ray
    assert json.loads((tmp_path / "cache" / "speed.json").read_text())  # measured once, cached
