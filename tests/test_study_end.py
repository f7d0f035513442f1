"""The Optuna study told how each trial ended when a search ends (analysis/study_end.py), on a
hand-built experiment: trial folders in Tune's layout and a study as Ray's OptunaSearch leaves it."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from analysis.experiment import load_trials
from analysis.outcome import ENDS_FILE, INTERRUPTED, OUT_OF_BUDGET
from analysis.study import STUDY_NAME, TRIAL_ATTR, study_url
from analysis.study_end import search_over, settle_study
from trainable.config import TrialConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _trial(exp: Path, tid: str, lr: float, accs: list[float]) -> None:
    d = exp / f"trial_{tid}"
    d.mkdir(parents=True)
    cfg = TrialConfig.from_dict({"stage1_epochs": 1, "stage2_epochs": 3, "stage1_lr": lr}).to_dict()  # 4 epochs
    (d / "params.json").write_text(json.dumps(cfg))
    best, rows = 0.0, []
    for e, a in enumerate(accs, start=1):
        best = max(best, a)
        rows.append(json.dumps({"trial_id": tid, "epoch": e, "training_iteration": e, "val_acc": a,
                                "best_val_acc": best, "status": "ok"}))
    (d / "result.json").write_text("".join(r + "\n" for r in rows))


def _ask(study, tid: str, lr: float, reported: list[float]) -> int:
    """A RUNNING trial as OptunaSearch leaves it for the Tune trial `tid`: sampled, told each result but the last."""
    study.enqueue_trial({"stage1_lr": lr})
    t = study.ask()
    t.set_user_attr(TRIAL_ATTR, tid)
    t.suggest_float("stage1_lr", 1e-4, 1e-1, log=True)
    for step, v in enumerate(reported, start=1):
        t.report(v, step)
    return t.number


@pytest.fixture
def exp(tmp_path) -> Path:
    e = tmp_path / "exp"
    _trial(e, "done", 0.01, [0.2, 0.4, 0.5, 0.45])  # ran its 4 epochs; Optuna was told
    _trial(e, "cut", 0.02, [0.3, 0.55, 0.5])  # the budget ended it at epoch 3
    (e / "trial_never").mkdir()  # asked for, never started
    (e / ENDS_FILE).write_text(json.dumps({"cut": OUT_OF_BUDGET}))
    study = optuna.create_study(storage=study_url(e), study_name=STUDY_NAME, direction="maximize")
    done = _ask(study, "done", 0.01, [0.2, 0.4, 0.5])
    study.tell(done, 0.5)
    _ask(study, "cut", 0.02, [0.3, 0.55])  # Ray passed epoch 3 as its end, which never came
    study.ask().set_user_attr(TRIAL_ATTR, "never")  # the never-started trial
    study.enqueue_trial({"stage1_lr": 0.05}, user_attrs={"warm_start": "recipe"})  # never run
    return e


def _states(e: Path) -> list[tuple]:
    study = optuna.load_study(study_name=STUDY_NAME, storage=study_url(e))
    return [(t.state, t.value, dict(t.intermediate_values), t.user_attrs.get("status")) for t in study.trials]


def test_a_spent_budget_settles_every_trial(exp):
    assert search_over(load_trials(exp), -1, budget_spent=True)
    counts = settle_study(exp, over=True)
    assert counts == {OUT_OF_BUDGET: 1, "not started": 2}
    done, cut, never, waiting = _states(exp)
    assert done[:2] == (TrialState.COMPLETE, 0.5)  # untouched
    assert cut == (TrialState.PRUNED, 0.55, {1: 0.3, 2: 0.55, 3: 0.55}, OUT_OF_BUDGET)  # its last epoch too
    assert never[0] == waiting[0] == TrialState.FAIL
    assert never[3] == waiting[3] == "not started: the search ended"
    assert settle_study(exp, over=True) == {}  # nothing left RUNNING or WAITING


def test_an_interrupted_search_is_left_for_resume(exp):
    (exp / ENDS_FILE).write_text(json.dumps({"cut": INTERRUPTED}))
    trials = load_trials(exp)
    assert not search_over(trials, 16, budget_spent=False)
    before = _states(exp)
    assert settle_study(exp, over=False) == {}
    assert _states(exp) == before  # --resume continues these Optuna trials: they must stay open


def test_a_search_that_ran_all_its_samples_is_over(exp):
    (exp / ENDS_FILE).write_text("{}")
    (exp / "trial_never").rmdir()
    trials = load_trials(exp)
    assert search_over(trials, 2, budget_spent=False) and not search_over(trials, 3, budget_spent=False)


def test_no_study_no_change(tmp_path):
    assert settle_study(tmp_path, over=True) == {}


def test_a_cut_trial_whose_epochs_never_reached_the_searcher_is_pruned_with_them(tmp_path):
    """The budget stopped the search as a trial's first epoch came in: the epoch is in its folder
    but Ray never passed it to Optuna. Settled as the epochs on disk say, not as never started; each
    Optuna trial is settled by its own Tune trial, not by the first with a matching config."""
    e = tmp_path / "exp"
    _trial(e, "late", 0.03, [0.35])
    (e / "trial_never").mkdir()
    (e / ENDS_FILE).write_text(json.dumps({"late": OUT_OF_BUDGET}))
    study = optuna.create_study(storage=study_url(e), study_name=STUDY_NAME, direction="maximize")
    study.ask().set_user_attr(TRIAL_ATTR, "never")
    _ask(study, "late", 0.03, [])
    assert settle_study(e, over=True) == {OUT_OF_BUDGET: 1, "not started": 1}
    never, late = _states(e)
    assert never[0] == TrialState.FAIL and late == (TrialState.PRUNED, 0.35, {1: 0.35}, OUT_OF_BUDGET)
