"""The search's console and its record of how trials end, kept by one Ray Tune callback (`SearchLog`): the
progress line and the trial table, and trial_ends.json (the trials the search's end cut short, which a trial's
folder cannot tell from pruned). Tune's CLIReporter shows Tune's status, never pruned, oom or out of time budget."""
from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ray import tune
from ray.tune.experiment import Trial

from analysis.experiment import PARAM_COLUMNS, duration, fmt, param_cells, text_table
from analysis.outcome import (COMPLETED, EARLY_STOPPED, ENDED_BY_SEARCH, INTERRUPTED, NOT_STARTED, OUT_OF_BUDGET, PRUNED,
                              RUNNING, TrialView, failure_status, is_failure, outcome, write_ends)
from analysis.study import METRIC
from search.budget import exhausted
from search.ray_adapter import driver_staging_path

METRIC_COLUMNS = ["stage", "epoch", "val_acc", "best_val_acc"]
SHORT = {"unfreeze_depth": "unfreeze", "input_size": "input", "aug_strength": "aug",
         "stage1_lr": "s1_lr", "stage2_lr": "s2_lr", "stage3_lr": "s3_lr", "best_val_acc": "best"}
EVERY_S = 30.0
MAX_ROWS = 20
FINISHED = (COMPLETED, EARLY_STOPPED, PRUNED)  # ended by itself or by ASHA: not failed, not cut short
ROW_ORDER = {Trial.RUNNING: 0, Trial.TERMINATED: 1, Trial.PAUSED: 2, Trial.PENDING: 3, Trial.ERROR: 4}


def outcome_of(trial, cut: dict[str, str], status: str = "") -> str:
    """The trial's outcome; `cut`: the trials the search's end cut short; `status`: Tune's, unless given."""
    status = status or trial.status
    return outcome(TrialView(trial.config or {}, trial.last_result or {}, errored=status == Trial.ERROR,
                             live=status, ended_by_search=cut.get(str(trial.trial_id), "")))


def end_reason(exp: Path | None) -> str:
    """Why the search ended with trials still running: its --time-budget ran out, else Ctrl-C."""
    return OUT_OF_BUDGET if exp is not None and exhausted(exp) else INTERRUPTED


def best_score(trial) -> float | None:
    r = trial.last_result or {}
    v = r.get(f"best_{METRIC}", r.get(METRIC))
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) and not failure_status(r) else None


@dataclass
class Progress:
    """What the progress line counts: (outcome, seconds run) of each trial that ended or runs."""
    total: int | None  # trials the search will run (None: unbounded)
    runs: list[tuple[str, float | None]] = field(default_factory=list)  # a running trial's outcome is RUNNING
    best: tuple[float, str] | None = None  # the best score and its trial
    prior_trial_s: float | None = None  # the pre-launch cost estimate of a trial (planning/estimate.py)

    @classmethod
    def of(cls, trials: list, total: int | None, seconds: dict[str, float] | None = None, prior_trial_s: float | None = None,
           cut: dict[str, str] | None = None, ending: tuple | None = None) -> Progress:
        """`seconds`: wall time per trial id (else Tune's time_total_s); `ending`: (trial, Tune status) of the
        trial whose end is being reported, before Tune marks it."""
        p = cls(total, prior_trial_s=prior_trial_s)
        for t in trials:
            status = ending[1] if ending and t is ending[0] else t.status
            name = outcome_of(t, cut or {}, status)
            secs = (seconds or {}).get(str(t.trial_id), (t.last_result or {}).get("time_total_s"))
            secs = float(secs) if isinstance(secs, (int, float)) else None
            if status == Trial.RUNNING:
                p.runs.append((RUNNING, secs))
            elif status == Trial.TERMINATED and name != NOT_STARTED or status == Trial.ERROR and is_failure(name):
                p.runs.append((name, secs))  # Tune's cleanup marks the trials it never started terminated too
        scores = [(score, str(t.trial_id)) for t in trials if (score := best_score(t)) is not None]
        p.best = max(scores, key=lambda s: s[0], default=None)  # a tie: the first trial
        return p

    def count(self, names) -> int:
        return sum(name in names for name, _ in self.runs)

    def eta(self, parallel: int) -> float | None:
        """Seconds left: the mean trial time (the estimate until a trial ends) x trials not started,
        plus what the running ones still need of it, over the trials run at once."""
        ran = [s for name, s in self.runs if name in FINISHED and s is not None]
        if self.total is None or not (ran or self.prior_trial_s):
            return None
        mean = sum(ran) / len(ran) if ran else float(self.prior_trial_s)
        running = [s or 0.0 for name, s in self.runs if name == RUNNING]
        not_started = max(0, self.total - len(self.runs) + self.count(ENDED_BY_SEARCH))
        return (not_started * mean + sum(max(0.0, mean - s) for s in running)) / max(1, parallel)

    def line(self, elapsed: float, parallel: int, budget_left: float | None = None) -> str:
        """The one-line summary; `budget_left`: seconds left of a --time-budget, which bounds the ETA."""
        cut = [name for name, _ in self.runs if name in ENDED_BY_SEARCH]
        finished = len(self.runs) - len(cut) - self.count({RUNNING})
        parts = [f"{finished}/{'?' if self.total is None else self.total} trials finished",
                 f"{self.count({RUNNING})} running", f"{self.count({PRUNED})} pruned",
                 f"{sum(is_failure(name) for name, _ in self.runs)} failed"]
        if cut:
            parts.append(f"{len(cut)} {cut[-1]}")
        parts += [f"best {METRIC} " + (f"{self.best[0]:.4f} ({self.best[1]})" if self.best is not None else "-"),
                  f"elapsed {duration(elapsed)}"]
        eta = self.eta(parallel)
        if cut:
            parts.append("search interrupted: --resume continues it" if cut[-1] == INTERRUPTED
                         else "search stopped: the time budget is spent")
        elif self.total is not None and finished >= self.total:
            parts.append("done")
        elif budget_left is not None:
            parts.append(f"time budget: {duration(budget_left if eta is None else min(eta, budget_left))} left")
        else:
            parts.append(f"about {duration(eta)} left" if eta is not None else "time left: known after the first trial ends")
        return "[search] " + " | ".join(parts)


def table_rows(trials: list, cut: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, a row per trial): running trials first, then by best val_acc; the status column is the outcome."""
    def key(t):
        score = best_score(t)
        return ROW_ORDER.get(t.status, 5), -(score if score is not None else -1.0)
    rows = [[str(t.trial_id), outcome_of(t, cut or {})] + param_cells(t.config or {})
            + [fmt((t.last_result or {}).get(k)) for k in METRIC_COLUMNS] for t in sorted(trials, key=key)]
    return ["trial", "status"] + [SHORT.get(k, k) for k in PARAM_COLUMNS + METRIC_COLUMNS], rows


class SearchLog(tune.Callback):
    """Records when each trial started and ended (those left at the end were cut short) and prints from that.
    `budget`: the BudgetStopper bounding the ETA; `sync`: storage.Place.sync(staging folder, force)."""

    def __init__(self, exp: Path, every_s: float = EVERY_S, prior_trial_s: float | None = None, budget=None,
                 sync: Callable[[str | None, bool], None] | None = None):
        self.exp, self.every_s, self.prior_trial_s, self.budget, self.sync = exp, every_s, prior_trial_s, budget, sync
        self.total: int | None = None
        self.start = self.last_line = self.last_table = time.monotonic()
        self.parallel = 1  # most trials seen running at once
        self.started: dict[str, float] = {}  # trial id -> monotonic start
        self.ended: dict[str, float] = {}  # trial id -> wall seconds it ran

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.total = total_num_samples if total_num_samples and total_num_samples < 10**9 else None
        self.start = self.last_line = self.last_table = time.monotonic()

    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        self.started.setdefault(str(trial.trial_id), time.monotonic())
        self.ended.pop(str(trial.trial_id), None)  # restarted after a failure
        self._sync(trial, force=True)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        self._sync(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        self._end(trials, trial, Trial.TERMINATED)

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        self._end(trials, trial, Trial.ERROR)

    def on_step_end(self, iteration: int, trials: list, **info):
        running = sum(t.status == Trial.RUNNING for t in trials)
        self.parallel = max(self.parallel, running)
        if trials and time.monotonic() - self.last_table >= self.every_s:
            self.print_table(trials)
        if running and time.monotonic() - self.last_line >= self.every_s:
            self.print_line(trials)

    def on_experiment_end(self, trials: list, **info):
        reason, unended = end_reason(self.exp), self.started.keys() - self.ended.keys()
        cut = {str(t.trial_id): reason for t in trials if str(t.trial_id) in unended and t.status != Trial.ERROR}
        write_ends(self.exp, cut, set(self.ended))
        self.print_table(trials, cut=cut)
        if cut:
            self.print_line(trials, cut=cut)
        self._sync(trials[0] if trials else None, force=True)

    def _sync(self, trial, force: bool = False) -> None:
        if self.sync is not None:
            self.sync(driver_staging_path(trial), force)

    def _end(self, trials: list, trial, status: str) -> None:
        t0 = self.started.get(str(trial.trial_id), time.monotonic())
        self.ended[str(trial.trial_id)] = time.monotonic() - t0
        self.print_line(trials, ending=(trial, status))
        self._sync(trial, force=True)

    def print_line(self, trials: list, ending: tuple | None = None, cut: dict[str, str] | None = None) -> None:
        now = time.monotonic()
        seconds = {k: now - t0 for k, t0 in self.started.items()} | self.ended
        p = Progress.of(trials, self.total, seconds, self.prior_trial_s, cut, ending)
        self.parallel = max(self.parallel, p.count({RUNNING}) + (ending is not None))
        print(p.line(now - self.start, self.parallel, self.budget.left() if self.budget else None))
        self.last_line = now

    def print_table(self, trials: list, cut: dict[str, str] | None = None) -> None:
        """The table with fixed columns; at the end (`cut` given) every trial, cut-short ones as such."""
        head, rows = table_rows(trials, cut)
        shown = rows if cut is not None else rows[:MAX_ROWS]
        status = " | ".join(f"{n} {s}" for s, n in sorted(Counter(row[1] for row in rows).items()))
        lines = [f"Trial status: {status} | elapsed {duration(time.monotonic() - self.start)}", text_table(head, shown)]
        if len(rows) > len(shown):
            lines.append(f"... and {len(rows) - len(shown)} more trials")
        print("\n".join(lines))
        self.last_table = time.monotonic()


def _drop_contradicting(record: logging.LogRecord) -> bool:
    """False for Ray's `Tuner.restore(...)` hint (run.py prints --resume) and its `Failed to fetch metrics`
    warning where every trial named never started."""
    msg = record.getMessage()
    fails = [ln for ln in msg.splitlines()[1:] if ln.startswith("- ")]
    never_started = msg.startswith("Failed to fetch metrics") and bool(fails) and all("FileNotFoundError" in ln for ln in fails)
    return "Resume experiment with:" not in msg and not never_started


def quiet_ray_console() -> None:
    """Keep Ray Tune from printing what contradicts this console: the new engine's start-up table (`Number of
    trials 9223372036854775807` when unbounded; the legacy one prints only errors at verbose=0) and the above."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis"):
        logging.getLogger(name).addFilter(_drop_contradicting)  # a filter already there is not added again
