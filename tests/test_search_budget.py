"""Issue 10 through the CLI: the recipes are the first trials, a time budget ends the search and
--resume continues with what is left of it, --estimate exits without training."""
from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import yaml

import run_search
from analysis.experiment import load_trials
from search.budget import BUDGET_FILE
from planning.settings import parse_duration
from spaces import Options, get_space
from spaces.warm_start import recipe_points
from tests.conftest import REPO, WEIGHTS, run_cli
from tests.printed import check_command, printed_after

BUDGET_S = 60  # counted from the command's start: the checks, the estimate and Ray's start-up come out of it


def _args(data_dir, storage, name):
    pretrained = (WEIGHTS / "tf_efficientnet_lite0.pth").is_file()
    return ["--gpus", "0", "--space", "cpu", "--backbones", "tf_efficientnet_lite0", "--max-epochs", 2,
            "--set", "input_size=32", "--subset", 5, "--data-dir", data_dir, "--storage-path", storage,
            "--name", name, "--max-concurrent", 1,
            *(["--weights-dir", WEIGHTS] if pretrained else ["--no-pretrained"])]


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory, data_dir):
    storage = tmp_path_factory.mktemp("runs")
    env = {"CIFAR_TUNE_CACHE": str(storage / "cache")}
    # the cost estimate measured first (cached, as a user's next search finds it), so a budget counted from the
    # command's start goes to trials, not to timing them, on a slow or busy machine too
    run_cli("run_search.py", *_args(data_dir, storage, "budget"), "--estimate", "--time-budget", f"{BUDGET_S}s",
            env=env, check=True)
    t0 = time.monotonic()
    proc = run_cli("run_search.py", *_args(data_dir, storage, "budget"), "--time-budget", f"{BUDGET_S}s",
                   env=env, check=True)
    return storage / "budget", proc, time.monotonic() - t0


def _points(exp):
    s = yaml.safe_load((exp / "search_settings.yaml").read_text())
    base = {"pretrained": not s["no_pretrained"], "weights_dir": s["weights_dir"], "seed": 0, "compile": False}
    space = get_space("cpu")
    return recipe_points(space, Options(("tf_efficientnet_lite0",), 2), base, {"input_size": 32})[0]


def test_the_first_trials_are_the_recipe_points(budgeted):
    exp, proc, _ = budgeted
    import optuna

    from analysis.study import STUDY_NAME, TRIAL_ATTR, study_url
    points = _points(exp)
    assert len(points) >= 4 and "warm start: " in proc.stdout
    # a budget too short for a screen and one promotion runs them whole, cheapest first (planning/plan.py)
    order = json.loads((exp / "budget_plan.json").read_text()).get("order") or range(len(points))
    points = [points[i] for i in order]
    started = [t for t in load_trials(exp) if t.results]
    assert started, proc.stdout[-2000:]
    n = min(len(started), len(points))

    def hp(c: dict) -> dict:  # a screened point trains on a fraction of the data (planning/plan.py)
        return {k: v for k, v in c.items() if k != "train_fraction"}
    # the order they were asked in is Optuna's trial order (one trial at a time: the order they ran; Ray's
    # whole-second timestamps cannot order trials shorter than a second)
    asked = sorted(optuna.load_study(study_name=STUDY_NAME, storage=study_url(exp)).trials, key=lambda t: t.number)
    assert [t.user_attrs["warm_start"] for t in asked[:n]] == [p.name for p in points[:n]]
    # each Tune trial that ran is the Optuna trial it was asked for, by id, with the point's config
    by_id = {t.trial_id: t for t in started}
    ran = [(p, by_id[t.user_attrs[TRIAL_ATTR]]) for p, t in zip(points[:n], asked) if t.user_attrs.get(TRIAL_ATTR) in by_id]
    assert ran and all(hp(t.config) == hp(p.config) for p, t in ran)



def test_the_budget_ends_the_search_and_the_best_is_exported(budgeted):
    exp, proc, wall = budgeted
    spent = json.loads((exp / BUDGET_FILE).read_text())
    assert spent["budget_s"] == BUDGET_S and BUDGET_S <= spent["spent_s"] < BUDGET_S + 30
    assert (exp / "best_config.yaml").is_file() and "best: trial" in proc.stdout
    assert "cost estimate" in proc.stdout and "time budget" in proc.stdout  # printed before launch
    assert (exp / "estimate.json").is_file()
    for t in load_trials(exp):  # stopped cleanly: every reported epoch is a whole epoch with a score
        assert all(r.get("status", "ok") == "ok" for r in t.results)


def test_resume_gets_only_what_is_left_of_the_budget(budgeted, data_dir, capsys):
    """main() in this process (tests/test_bad_input.py runs a refusal as a process)."""
    exp, _, _ = budgeted
    before = {t.trial_id: t.epochs_run for t in load_trials(exp)}
    t0 = time.monotonic()
    code = run_search.main([*map(str, _args(data_dir, exp.parent, "budget")), "--resume"])
    out, err = capsys.readouterr()
    after = {t.trial_id: t.epochs_run for t in load_trials(exp)}
    assert after == before, out[-3000:]  # nothing left to spend: no new trial, no new epoch
    assert code == 2 and f"has spent its --time-budget of {BUDGET_S}s" in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1
    check_command(printed_after(err.split("see its results with", 1)[1], ""))
    assert time.monotonic() - t0 < 60  # said before Ray starts


def test_a_budget_the_set_up_uses_up_says_so(tmp_path, data_dir, monkeypatch, capsys):
    """--time-budget counts from the command's start: one the checks and the estimate use up is refused in one
    line before Ray starts, not run into an experiment with no trial."""
    monkeypatch.setenv("CIFAR_TUNE_CACHE", str(tmp_path / "cache"))
    code = run_search.main([*map(str, _args(data_dir, tmp_path, "tiny")), "--time-budget", "1s"])
    err = capsys.readouterr().err
    assert code == 2 and "--time-budget 1s was used up by the checks and the cost estimate" in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "tiny" / "search_settings.yaml").exists()


def test_estimate_exits_without_training(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("CIFAR_TUNE_CACHE", str(tmp_path / "cache"))
    code = run_search.main([*map(str, _args(data_dir, tmp_path, "est")), "--estimate", "--num-samples", "8"])
    out = capsys.readouterr().out
    assert code == 0 and "cost estimate" in out and "8 trials: at most" in out
    assert "tf_efficientnet_lite0@32" in out
    assert not (tmp_path / "est").exists()  # no experiment, no Ray
    assert json.loads((tmp_path / "cache" / "speed.json").read_text())  # measured once, cached


def test_ray_prints_nothing_that_contradicts_the_console(budgeted):
    """Ray's start-up table (its "Number of trials" is sys.maxsize under a --time-budget), its
    TensorBoard command for a staging folder under /tmp/ray, and its warning about trials that
    never started: none of them, beside our own lines."""
    _, proc, _ = budgeted
    out = proc.stdout + proc.stderr
    for line in ("Number of trials", "9223372036854775807", "To visualize your results with TensorBoard",
                 "driver_artifacts", "Failed to fetch metrics", "Tuner.restore", "Configuration for experiment"):
        assert line not in out, line
    assert "experiment: " in proc.stdout and "[search] " in proc.stdout and "Trial status:" in proc.stdout


def test_a_budget_of_recipe_points_says_so_before_launch(budgeted):
    _, proc, _ = budgeted
    out = proc.stdout
    note = next(ln for ln in out.splitlines() if ln.startswith("note: that is too few"))
    assert "budget plan: " in out and "recipe point(s)" in out
    assert out.index(note) < out.index("experiment: ")  # before any trial starts
    parse_duration(note.rsplit("--time-budget ", 1)[1])  # a budget the user can pass as it is


def test_the_study_says_how_every_trial_ended(budgeted):
    """What optuna-dashboard shows once the budget is spent: nothing left running or waiting;
    a cut trial is pruned with its last value, one that never ran failed with the reason."""
    import optuna
    from optuna.trial import TrialState

    from analysis.outcome import OUT_OF_BUDGET
    from analysis.study import STUDY_NAME, TRIAL_ATTR, study_url
    exp, _, _ = budgeted
    study = optuna.load_study(study_name=STUDY_NAME, storage=study_url(exp))
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    for t in study.trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs["status"].startswith(("not started", OUT_OF_BUDGET)), t.user_attrs
        if t.state == TrialState.PRUNED:
            assert t.value is not None and t.intermediate_values
    # a trial the budget cut after an epoch keeps its value as pruned (found by its Tune trial id). The budget's
    # stop can come with a trial's last result: Ray then tells the searcher, which tells Optuna PRUNED before
    # the search's end can add the reason (Optuna refuses attrs on a finished trial), so the reason is not asked
    by_id = {t.user_attrs.get(TRIAL_ATTR): t for t in study.trials}
    cut = [t for t in load_trials(exp) if t.status == OUT_OF_BUDGET and t.results]
    seen = ([(t.number, t.state.name, t.params, t.intermediate_values, t.user_attrs) for t in study.trials],
            [(t.trial_id, t.status, t.config, [r.get("training_iteration") for r in t.results]) for t in load_trials(exp)])
    assert all(by_id[t.trial_id].state == TrialState.PRUNED and by_id[t.trial_id].value is not None for t in cut), seen


def test_printed_commands_run_as_printed(budgeted):
    """Each command the search prints, pasted into a shell in the project folder; the retrain
    command is run for real and prints its expected time and an ETA per epoch."""
    exp, proc, _ = budgeted
    out = proc.stdout
    check_command(printed_after(out, "TensorBoard: "))
    token = out.split("(login token: ", 1)[1].split(")", 1)[0]
    assert check_command(token)[-1] == "get-auth-token"
    retrain = check_command(printed_after(out, "retrain and test it: "))
    assert "--config" not in retrain and "--data-dir" not in retrain  # analyze.py's defaults
    run = subprocess.run(retrain, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^expected time: about \S+ for \d+ epoch", run.stdout, flags=re.M), run.stdout[-2000:]
    assert re.search(r"^  epoch 1/\d+ .* eta \S+$", run.stdout, flags=re.M), run.stdout[-2000:]
    assert (exp / "analysis" / "test_metrics.json").is_file()
