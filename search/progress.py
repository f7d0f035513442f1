"""The search's console and its record of how trials end, kept by one Ray Tune callback (`SearchLog`):
a progress line when a trial ends (else every 30 s), the trial table every 30 s and at the end, and
trial_ends.json, the trials the search's own end cut short (Ctrl-C, a spent --time-budget), which
nothing in a trial's folder tells apart from ASHA pruning it. Tune's CLIReporter shows Tune's status
(TERMINATED), which cannot say pruned, oom or out of time budget.
"""
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
from analysis.outcome import (ENDED_BY_SEARCH, INTERRUPTED, NOT_STARTED, OUT_OF_BUDGET, PRUNED, TrialView, failure_status,
                              is_failure, outcome, write_ends)
from analysis.study import METRIC
from search.budget import exhausted
from search.ray_adapter import driver_staging_path

METRIC_COLUMNS = ["stage", "epoch", "val_acc", "best_val_acc"]
SHORT = {"unfreeze_depth": "unfreeze", "input_size": "input", "aug_strength": "aug",
         "stage1_lr": "s1_lr", "stage2_lr": "s2_lr", "stage3_lr": "s3_lr", "best_val_acc": "best"}
EVERY_S = 30.0
MAX_ROWS = 20
ROW_ORDER = {Trial.RUNNING: 0, Trial.TERMINATED: 1, Trial.PAUSED: 2, Trial.PENDING: 3, Trial.ERROR: 4}


def outcome_of(trial, cut: dict[str, str], status: str = "") -> str:
    """The trial's outcome (analysis.outcome); `cut`: {trial_id: reason} of the trials the search's end
    cut short; `status` overrides Tune's (a callback hears of an end before Tune updates the trial)."""
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


def budget_text(seconds: float) -> str:
    """Seconds as a --time-budget value, rounded up to a whole minute: "9m", "1h05m"."""
    m = max(1, math.ceil(seconds / 60))
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m"


@dataclass
class Progress:
    total: int | None  # trials the search will run (None: unbounded)
    done: int = 0  # ended normally, pruned included
    pruned: int = 0  # by ASHA
    failed: int = 0
    running: int = 0
    cut_short: int = 0  # interrupted or out of time budget: not finished
    cut_reason: str = ""
    best: float | None = None
    best_trial: str = ""
    trial_seconds: list[float] = field(default_factory=list)  # wall time of each ended trial
    running_seconds: list[float] = field(default_factory=list)  # how long each running one has run
    prior_trial_s: float | None = None  # the pre-launch cost estimate of a trial (search/estimate.py)

    def eta(self, parallel: int) -> float | None:
        """Seconds left: the mean trial time (the estimate until a trial ends) x trials not started,
        plus what the running ones still need of it, over the trials run at once."""
        if self.total is None or not (self.trial_seconds or self.prior_trial_s):
            return None
        mean = (sum(self.trial_seconds) / len(self.trial_seconds) if self.trial_seconds
                else float(self.prior_trial_s))
        not_started = max(0, self.total - self.done - self.failed - self.running)
        work = not_started * mean + sum(max(0.0, mean - s) for s in self.running_seconds)
        return work / max(1, parallel)


def progress_of(trials: list, total: int | None, ended=None, failed=None, seconds: dict[str, float] | None = None,
                prior_trial_s: float | None = None, cut: dict[str, str] | None = None) -> Progress:
    """Counts over the trials; `ended`/`failed`: the trial Tune reports as such right now.
    `seconds`: wall time per trial id (else Tune's time_total_s); `cut`: trials the search's end cut short."""
    p = Progress(total, prior_trial_s=prior_trial_s)
    for t in trials:
        status = Trial.ERROR if t is failed else Trial.TERMINATED if t is ended else t.status
        secs = (seconds or {}).get(str(t.trial_id), (t.last_result or {}).get("time_total_s"))
        name = outcome_of(t, cut or {}, status)
        if status in (Trial.ERROR, Trial.TERMINATED) and is_failure(name):  # errored, diverged, oom
            p.failed += 1
        elif status == Trial.TERMINATED and name in ENDED_BY_SEARCH:  # not finished: --resume continues it
            p.cut_short, p.cut_reason = p.cut_short + 1, name
        elif status == Trial.TERMINATED and name != NOT_STARTED:  # cleanup marks unstarted ones terminated too
            p.done += 1
            p.pruned += name == PRUNED
            if isinstance(secs, (int, float)):
                p.trial_seconds.append(float(secs))
        elif status == Trial.RUNNING:
            p.running += 1
            p.running_seconds.append(float(secs) if isinstance(secs, (int, float)) else 0.0)
        score = best_score(t)
        if score is not None and (p.best is None or score > p.best):
            p.best, p.best_trial = score, str(t.trial_id)
    return p


def progress_line(p: Progress, elapsed: float, parallel: int, budget_left: float | None = None) -> str:
    """The one-line summary; `budget_left`: seconds left of a --time-budget, which bounds the ETA."""
    parts = [f"{p.done + p.failed}/{'?' if p.total is None else p.total} trials finished",
             f"{p.running} running", f"{p.pruned} pruned", f"{p.failed} failed"]
    if p.cut_short:
        parts.append(f"{p.cut_short} {p.cut_reason}")
    parts += [f"best {METRIC} " + (f"{p.best:.4f} ({p.best_trial})" if p.best is not None else "-"),
              f"elapsed {duration(elapsed)}"]
    eta = p.eta(parallel)
    if p.cut_short:
        parts.append("search interrupted: --resume continues it" if p.cut_reason == INTERRUPTED
                     else "search stopped: the time budget is spent")
    elif p.total is not None and p.done + p.failed >= p.total:
        parts.append("done")
    elif budget_left is not None:
        parts.append(f"time budget: {duration(budget_left if eta is None else min(eta, budget_left))} left")
    else:
        parts.append(f"about {duration(eta)} left" if eta is not None else "time left: known after the first trial ends")
    return "[search] " + " | ".join(parts)


def table_rows(trials: list, cut: dict[str, str] | None = None, params: list[str] = PARAM_COLUMNS,
               metrics: list[str] = METRIC_COLUMNS) -> tuple[list[str], list[list[str]]]:
    """(header, a row per trial): running trials first, then by best val_acc; the status column is the outcome."""
    def key(t):
        score = best_score(t)
        return ROW_ORDER.get(t.status, 5), -(score if score is not None else -1.0)
    rows = [[str(t.trial_id), outcome_of(t, cut or {})] + param_cells(t.config or {}, params)
            + [fmt((t.last_result or {}).get(k)) for k in metrics] for t in sorted(trials, key=key)]
    return ["trial", "status"] + [SHORT.get(k, k) for k in params + metrics], rows


class SearchLog(tune.Callback):
    """Records when each trial started and whether it ended by itself or by the scheduler (those
    left at the experiment's end were cut short by it), and prints the progress line and the table
    from that record. `budget`: the search's BudgetStopper, whose left() bounds the ETA; `sync`:
    storage.Place.sync, called (staging folder, force) when the study may have changed."""

    def __init__(self, exp: Path | None = None, every_s: float = EVERY_S, out: Callable[[str], None] | None = None,
                 prior_trial_s: float | None = None, budget=None, sync: Callable[[str | None, bool], None] | None = None):
        self.exp = Path(exp) if exp is not None else None
        # out None: print, looked up when called (Tune pickles callbacks; a swapped builtins.print won't pickle)
        self.every_s, self.out, self.prior_trial_s, self.budget, self.sync = every_s, out, prior_trial_s, budget, sync
        self.total: int | None = None
        self.start = self.last_line = self.last_table = time.monotonic()
        self.parallel = 1  # most trials seen running at once
        self.started: dict[str, float] = {}  # trial id -> monotonic start
        self.ended: dict[str, float] = {}  # trial id -> wall seconds it ran

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.total = total_num_samples if total_num_samples and total_num_samples < 10**9 else None
        self.start = self.last_line = self.last_table = time.monotonic()

    def cut_short(self, trials: list) -> dict[str, str]:
        """{trial_id: INTERRUPTED | OUT_OF_BUDGET} for the started trials that never ended."""
        reason = end_reason(self.exp)
        return {str(t.trial_id): reason for t in trials
                if str(t.trial_id) in self.started and str(t.trial_id) not in self.ended and t.status != Trial.ERROR}

    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        self.started.setdefault(str(trial.trial_id), time.monotonic())
        self.ended.pop(str(trial.trial_id), None)  # restarted after a failure
        self._sync(trial, force=True)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        self._sync(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        self._end(trials, trial, ended=trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        self._end(trials, trial, failed=trial)

    def on_step_end(self, iteration: int, trials: list, **info):
        running = sum(t.status == Trial.RUNNING for t in trials)
        self.parallel = max(self.parallel, running)
        if trials and time.monotonic() - self.last_table >= self.every_s:
            self.print_table(trials)
        if running and time.monotonic() - self.last_line >= self.every_s:
            self.print_line(trials)

    def on_experiment_end(self, trials: list, **info):
        cut = self.cut_short(trials)
        if self.exp is not None:
            write_ends(self.exp, cut, set(self.ended))
        self.print_table(trials, cut=cut)
        if cut:  # Ctrl-C or the time budget: say how many trials it cut short
            self.print_line(trials, cut=cut)
        self._sync(trials[0] if trials else None, force=True)

    def _sync(self, trial, force: bool = False) -> None:
        if self.sync is not None:
            self.sync(driver_staging_path(trial), force)

    def _end(self, trials: list, trial, **which) -> None:
        t0 = self.started.get(str(trial.trial_id), time.monotonic())
        self.ended[str(trial.trial_id)] = time.monotonic() - t0
        self.print_line(trials, **which)
        self._sync(trial, force=True)

    def print_line(self, trials: list, **which) -> None:
        now = time.monotonic()
        seconds = {k: now - t0 for k, t0 in self.started.items()} | self.ended
        p = progress_of(trials, self.total, seconds=seconds, prior_trial_s=self.prior_trial_s, **which)
        self.parallel = max(self.parallel, p.running + ("ended" in which or "failed" in which))
        (self.out or print)(progress_line(p, now - self.start, self.parallel, self.budget.left() if self.budget else None))
        self.last_line = now

    def print_table(self, trials: list, cut: dict[str, str] | None = None) -> None:
        """The table with fixed columns; at the end (`cut` given) every trial, cut-short ones as such."""
        head, rows = table_rows(trials, cut)
        shown = rows if cut is not None else rows[:MAX_ROWS]
        status = " | ".join(f"{n} {s}" for s, n in sorted(Counter(row[1] for row in rows).items()))
        lines = [f"Trial status: {status} | elapsed {duration(time.monotonic() - self.start)}", text_table(head, shown)]
        if len(rows) > len(shown):
            lines.append(f"... and {len(rows) - len(shown)} more trials")
        (self.out or print)("\n".join(lines))
        self.last_table = time.monotonic()


def _drop_contradicting(record: logging.LogRecord) -> bool:
    """False for a Ray log record that contradicts this console (see quiet_ray_console)."""
    msg = record.getMessage()
    if "Resume experiment with:" in msg:  # Tuner.restore(...): run.py prints the --resume command
        return False
    if msg.startswith("Failed to fetch metrics"):  # kept unless every trial named never started
        fails = [ln for ln in msg.splitlines()[1:] if ln.startswith("- ")]
        return not fails or not all("FileNotFoundError" in ln for ln in fails)
    return True


def quiet_ray_console() -> None:
    """Keep Ray Tune from printing what contradicts this console: its default engine's start-up table
    (`Number of trials 9223372036854775807` for an unbounded search, a TensorBoard command for its
    staging folder; the legacy engine prints only trial errors at verbose=0), its `Tuner.restore(...)`
    line after Ctrl-C (the CLI prints the --resume command) and its `Failed to fetch metrics` warning
    for trials that never started (the summary lists them as not started)."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis"):
        logger = logging.getLogger(name)
        if _drop_contradicting not in logger.filters:
            logger.addFilter(_drop_contradicting)
