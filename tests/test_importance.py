"""report/importance.py: importance comes from the search's saved Optuna study (optuna.db), where a
conditional parameter exists only in the trials that sampled it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest

from analysis.experiment import load_trials
from report.build import write_report
from analysis.study import STUDY_FILE, STUDY_NAME, TRIAL_ATTR, load_study
from report.importance import compute_importance
from trainable.config import TrialConfig

N_TRIALS = 24


def _objective(trial: optuna.Trial) -> float:
    """val_acc driven by the lr and the schedule; plateau_patience exists only for a constant
    schedule and changes nothing."""
    trial.set_user_attr(TRIAL_ATTR, f"trial_{trial.number:05d}")  # as the search tags it (search/searcher.py)
    lr = trial.suggest_float("stage1_lr", 1e-4, 1e-1, log=True)
    schedule = trial.suggest_categorical("schedule", ["cosine", "onecycle", "constant"])
    trial.suggest_float("aug_strength", 0.0, 1.0)
    if schedule == "constant":
        trial.suggest_int("plateau_patience", 1, 4)
    return 0.6 - 0.05 * abs(math.log10(lr) + 2.5) - (0.15 if schedule == "constant" else 0.0)


def _experiment(root: Path, n_trials: int = N_TRIALS) -> Path:
    """An experiment folder as a search leaves it: trial_*/params.json (every field, defaults
    included) and result.json, and the Optuna study in optuna.db."""
    exp = root / "exp"
    exp.mkdir()
    storage = f"sqlite:///{(exp / STUDY_FILE).resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=3))
    study.optimize(_objective, n_trials=n_trials)
    for t in study.trials:
        d = exp / f"trial_{t.number:05d}"
        d.mkdir()
        config = TrialConfig.from_dict(t.params).to_dict()  # plateau_patience 0 where not sampled
        (d / "params.json").write_text(json.dumps(config))
        rows = [{"trial_id": d.name, "epoch": e, "stage": 1 if e == 1 else 2, "val_acc": t.value - 0.1 * (3 - e),
                 "val_loss": 1.0, "train_loss": 1.0, "lr": 0.01} for e in (1, 2, 3)]
        (d / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return exp


def test_conditional_parameter_gets_no_share_from_its_default(tmp_path):
    exp = _experiment(tmp_path)
    imp = compute_importance(load_trials(exp), exp)
    assert imp.evaluator == "fANOVA"
    assert imp.values.get("plateau_patience", 0.0) < 0.05, imp.values
    assert max(imp.values, key=imp.values.get) in ("schedule", "stage1_lr")
    assert "plateau_patience" in imp.note and "not sampled in every trial" in imp.note
    assert "params.json" not in imp.note
    assert len(imp.study.trials) == N_TRIALS
    # every study trial was matched to its Tune trial (by its sampled values) for the plots
    assert {t.user_attrs["status"] for t in imp.study.trials} == {"completed"}


def test_report_uses_the_saved_study(tmp_path):
    exp = _experiment(tmp_path)
    page = write_report(exp).read_text()
    assert (exp / "analysis" / "param_importance.png").exists()
    assert "not sampled in every trial: plateau_patience" in page


def test_unfinished_trials_of_the_study_are_ignored(tmp_path):
    """A study with one complete trial (the rest running or failed) has nothing to compare."""
    exp = tmp_path / "exp"
    exp.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{exp / STUDY_FILE}", study_name=STUDY_NAME,
                                direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"stage1_lr": 0.01}, value=0.5, distributions={
        "stage1_lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}, user_attrs={TRIAL_ATTR: "a"}))
    study.ask({"stage1_lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})  # running
    failed = study.ask()
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    imp = compute_importance([], exp)
    assert not imp.values and "1 finished trial(s)" in imp.note and "needs at least 10" in imp.note


@pytest.mark.parametrize("n", [0, 1, 2, 9])
def test_too_few_trials(tmp_path, n):
    imp = compute_importance(load_trials(_experiment(tmp_path, n_trials=n)), tmp_path / "exp")
    assert not imp.values and f"{n} finished trial(s): importance needs at least 10" in imp.note


def test_no_study_no_importance(tmp_path):
    exp = _experiment(tmp_path)
    (exp / STUDY_FILE).unlink()
    assert load_study(exp) is None
    imp = compute_importance(load_trials(exp), exp)
    assert not imp.values and "0 finished trial(s)" in imp.note


def test_too_few_trials_show_a_sentence_not_a_chart(tmp_path):
    """fANOVA over a handful of trials draws noise as bars: the report says why there is none."""
    n = 9  # one short of the threshold
    exp = _experiment(tmp_path, n_trials=n)
    imp = compute_importance(load_trials(exp), exp)
    assert not imp.values and f"{n} finished trial(s)" in imp.note
    page = write_report(exp).read_text()
    assert "importance needs at least 10" in page
    assert not (exp / "analysis" / "param_importance.png").exists()
    assert not (exp / "analysis" / "val_acc_vs_top_params.png").exists()


def test_trials_told_from_earlier_experiments_stay_out(tmp_path):
    """--warm-start DIR tells the searcher another experiment's trials: they are in optuna.db but
    were not run by this search. Enqueued recipe points were, and count."""
    exp = _experiment(tmp_path)
    saved = load_study(exp)
    dist = {"stage1_lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
            "schedule": optuna.distributions.CategoricalDistribution(["cosine", "onecycle", "constant"]),
            "aug_strength": optuna.distributions.FloatDistribution(0.0, 1.0)}
    params = {"stage1_lr": 0.01, "schedule": "cosine", "aug_strength": 0.5}
    for i in range(5):
        saved.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=0.99,
                                                  user_attrs={"warm_start": f"old/trial_{i}", "status": "completed"}))
    saved.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=0.4,
                                              user_attrs={"warm_start": "recipe@x", TRIAL_ATTR: "x"}))
    imp = compute_importance(load_trials(exp), exp)
    assert len(imp.study.trials) == N_TRIALS + 1
    assert 0.99 not in {t.value for t in imp.study.trials}
