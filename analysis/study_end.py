"""The Optuna study told how each trial ended, when a search ends: Ray's OptunaSearch tells Optuna only
of trials Tune ended, so those the search's end cut short stay RUNNING and unrun points WAITING. A
trial cut after reporting epochs becomes PRUNED (Optuna keeps its last intermediate value), one that
never reported FAIL with the reason (Optuna cannot delete a trial). After Ctrl-C nothing changes:
`--resume` continues the same Optuna trials."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from analysis.experiment import TrialRecord, load_trials
from analysis.outcome import (
    COMPLETED,
    EARLY_STOPPED,
    INTERRUPTED,
    NOT_STARTED,
    OUT_OF_BUDGET,
    is_failure,
)
from analysis.study import STUDY_FILE, STUDY_NAME, TRIAL_ATTR, study_url

STEP, VALUE = "training_iteration", "best_val_acc"  # what Ray's OptunaSearch reports per result
REASON = "status"  # the user attr holding how the trial ended (as warm-start told trials carry it)


def search_over(trials: list[TrialRecord], num_samples: int, budget_spent: bool) -> bool:
    """Whether the search can run nothing more: its --time-budget is spent, or it ran all of its
    `num_samples` (-1: no limit) trials and none waits for --resume."""
    if budget_spent:
        return True
    waiting = any(t.status in (INTERRUPTED, NOT_STARTED) for t in trials)
    return num_samples >= 0 and not waiting and len(trials) >= num_samples


def _reported(t: TrialRecord) -> dict[int, float]:
    """{step: value} as OptunaSearch reported the trial's results to Optuna (the first of a step)."""
    out: dict[int, float] = {}
    for r in t.results:
        if isinstance(r.get(STEP), int) and isinstance(r.get(VALUE), (int, float)):
            out.setdefault(int(r[STEP]), float(r[VALUE]))
    return out


def settle_study(exp: Path, over: bool, why: str = "the search ended") -> Counter:
    """Give every RUNNING or WAITING trial of the study the state its end calls for, its outcome name
    in the user attr `status`. `over`: the search can run nothing more (`search_over`); else only
    trials that ended by themselves. `why`: for trials never started. Returns {outcome: count}."""
    if not (Path(exp) / STUDY_FILE).is_file():
        return Counter()
    storage = optuna.storages.RDBStorage(study_url(exp))
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    open_trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    trials = {t.trial_id: t for t in load_trials(exp)}
    done: Counter = Counter()
    for ot in open_trials:
        tid = storage.get_trial_id_from_study_id_trial_number(study_id, ot.number)
        steps = dict(ot.intermediate_values)
        t = trials.get(ot.user_attrs.get(TRIAL_ATTR))  # None: WAITING, never asked for
        name = t.status if t is not None else NOT_STARTED if not steps else OUT_OF_BUDGET if over else INTERRUPTED
        if not over and name in (INTERRUPTED, NOT_STARTED):
            continue  # --resume continues it (a WAITING point: starts it)
        if t is not None:
            for step, value in _reported(t).items():  # the epochs Ray did not pass on as intermediate
                if step not in steps:
                    storage.set_trial_intermediate_value(tid, step, value)
                    steps[step] = value
        if name == NOT_STARTED:
            _fail(storage, tid, f"{NOT_STARTED}: {why}")
        elif is_failure(name) or not steps:  # no value to keep: cut before its first epoch
            _fail(storage, tid, name)
        else:
            storage.set_trial_user_attr(tid, REASON, name)
            if name in (COMPLETED, EARLY_STOPPED):
                study.tell(ot.number, steps[max(steps)], skip_if_finished=True)
            else:  # pruned by ASHA, or cut short by the search's end: Optuna takes its last value
                study.tell(ot.number, state=TrialState.PRUNED, skip_if_finished=True)
        done[name] += 1
    return done


def _fail(storage: Any, trial_id: int, reason: str) -> None:
    storage.set_trial_user_attr(trial_id, REASON, reason)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)
