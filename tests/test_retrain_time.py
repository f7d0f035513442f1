"""analyze.py's retrain estimate: the selected trial's own epoch times, scaled, and the ETA."""
from __future__ import annotations

import pytest

from analysis.experiment import TrialRecord
from analyze import eta, expected_epochs


def _trial(times: dict[int, float]) -> TrialRecord:
    rows = [{"epoch": e, "time_this_iter_s": s} for e, s in times.items()]
    return TrialRecord("t", path=None, config={}, results=rows)


def test_each_epoch_as_the_trial_ran_it_scaled_to_the_retrain_images():
    t = _trial({1: 2.0, 2: 6.0, 3: 7.0})  # a frozen stage 1, then two trainable epochs
    assert expected_epochs(t, 3, 1.25) == [2.5, 7.5, 8.75]


def test_epochs_the_trial_never_ran_take_its_last_epoch_time():
    t = _trial({1: 2.0, 2: 6.0})  # pruned after epoch 2 of 4
    assert expected_epochs(t, 4, 1.0) == [2.0, 6.0, 6.0, 6.0]


def test_a_restarted_epoch_counts_once_and_untimed_trials_give_none():
    t = _trial({1: 2.0})
    t.results.append({"epoch": 1, "time_this_iter_s": 3.0})  # restarted from its checkpoint
    assert expected_epochs(t, 1, 1.0) == [3.0]
    assert expected_epochs(TrialRecord("x", path=None, config={}, results=[{"epoch": 1}]), 2, 1.0) is None


def test_eta_corrects_the_plan_by_the_epochs_done():
    plan = [2.0, 6.0, 6.0]
    assert eta(plan, 3, 0, 0.0) == 14.0  # the plan
    assert eta(plan, 3, 1, 4.0) == pytest.approx(24.0)  # this machine runs at half the trial's speed
    assert eta(plan, 3, 3, 20.0) == 0.0
    assert eta(None, 4, 1, 5.0) == 15.0  # no plan: the mean epoch so far
    assert eta(None, 4, 0, 0.0) is None
