"""A wall-clock budget that survives --resume (Tune's `time_budget_s` starts afresh on a restore): the time spent over
all runs is kept in budget.json; once it reaches the budget every trial stops as ASHA stops one."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ray import tune

from trainable import atomic

BUDGET_FILE = "budget.json"


def _read(exp: Path) -> tuple[float, float]:
    """(seconds spent, budget) from budget.json; (0, inf) for a new experiment or one without a budget."""
    try:
        d = json.loads((Path(exp) / BUDGET_FILE).read_text())
        return float(d["spent_s"]), float(d["budget_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0, float("inf")


def spent(exp: Path) -> float:
    return _read(exp)[0]


def exhausted(exp: Path) -> bool:
    """Whether the experiment's --time-budget is spent (False without one)."""
    used, budget = _read(exp)
    return used >= budget


class BudgetStopper(tune.Stopper):
    """Stops the whole search once `budget_s` of wall time (over all runs of it) is spent, counted from `started`
    (time.monotonic() when the command began; default now): the checks, the cost estimate and Ray's start-up
    before the first trial are part of what the user waits for, so they are part of the budget."""

    def __init__(self, exp: Path, budget_s: float, save_every_s: float = 5.0, started: float | None = None):
        self.exp, self.budget_s, self.save_every_s = Path(exp), float(budget_s), save_every_s
        self.before = spent(self.exp)  # the earlier runs' share (a resumed search)
        self.t0 = time.monotonic() if started is None else started
        self.last_save = time.monotonic()

    def used(self) -> float:
        return self.before + time.monotonic() - self.t0

    def left(self) -> float:
        return max(0.0, self.budget_s - self.used())

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False  # no single trial is stopped for its own sake

    def stop_all(self) -> bool:
        used = self.used()
        if used >= self.budget_s or time.monotonic() - self.last_save >= self.save_every_s:
            self.last_save = time.monotonic()
            state = {"budget_s": self.budget_s, "spent_s": round(used, 1)}
            atomic.write_text(self.exp / BUDGET_FILE, json.dumps(state) + "\n")
        return used >= self.budget_s
