"""The search's console: a trial table with the parameters that matter, and one overall progress line.

- `ProgressLine` (a tune.Callback) prints one line when a trial ends or fails, and otherwise at most
  every 30 s: trials finished / running / pruned by ASHA / failed (errored, diverged or out of
  memory), best val_acc so far, elapsed time and an estimate of the time left (mean wall time of
  the ended trials x trials not started, plus what the running ones still need of it, over the
  trials running at once).
- `TrialTable` prints the live trial table with fixed columns every 30 s and at the end. Ray's
  own console takes its columns from the Tuner's param_space, which is empty here (Optuna's
  define-by-run space), so Tune's console runs silent (verbose=0; trial errors are still logged).
- `quiet_ray_console()` keeps Ray from printing lines that contradict ours (see there).
- `console()` returns the RunConfig arguments.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable


from analysis.experiment import PARAM_COLUMNS, duration, fmt, param_cells
from analysis.outcome import (
    ENDED_BY_SEARCH,
    INTERRUPTED,
    NOT_STARTED,
    PRUNED,
    failure_status,
    is_failure,
    outcome,
)
from analysis.study import METRIC
from search.outcomes import EndWatch, live_view

METRIC_COLUMNS = ["stage", "epoch", "val_acc", "best_val_acc"]
SHORT = {"unfreeze_depth": "unfreeze", "input_size": "input", "aug_strength": "aug",
         "stage1_lr": "s1_lr", "stage2_lr": "s2_lr", "stage3_lr": "s3_lr", "best_val_acc": "best"}
EVERY_S = 30.0
MAX_ROWS = 20
RUNNING, TERMINATED, ERROR = "RUNNING", "TERMINATED", "ERROR"  # ray.tune.experiment.Trial statuses


# ---------------------------------------------------------------- shared: reading trials

def status_of(trial, status: str | None = None, ended_by_search: str = "") -> str:
    """The trial's outcome (analysis.outcome), or where it is while it runs."""
    return outcome(live_view(trial, status, ended_by_search))


def best_score(trial) -> float | None:
    r = trial.last_result or {}
    v = r.get(f"best_{METRIC}", r.get(METRIC))
    failed = bool(failure_status(r))
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) and not failed else None


def budget_text(seconds: float) -> str:
    """Seconds as a --time-budget value, rounded up to a whole minute: "9m", "1h05m"."""
    m = max(1, math.ceil(seconds / 60))
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m"


# ---------------------------------------------------------------- the progress line

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
        """Seconds left: the work left (trials not started x mean trial time, plus what the running
        ones still need of the mean) over the trials that run at once. Until a trial has ended,
        the mean is the cost estimate measured before launch."""
        if self.total is None or not (self.trial_seconds or self.prior_trial_s):
            return None
        mean = (sum(self.trial_seconds) / len(self.trial_seconds) if self.trial_seconds
                else float(self.prior_trial_s))
        not_started = max(0, self.total - self.done - self.failed - self.running)
        work = not_started * mean + sum(max(0.0, mean - s) for s in self.running_seconds)
        return work / max(1, parallel)


def progress_of(trials: list, total: int | None, ended: Any = None, failed: Any = None,
                seconds: dict[str, float] | None = None, prior_trial_s: float | None = None,
                cut: dict[str, str] | None = None) -> Progress:
    """Counts over the trials; `ended`/`failed` is a trial Tune is reporting as such right now
    (its status still says RUNNING during the callback). `seconds`: wall time per trial id, so far
    (start-up included); without it, Tune's time_total_s. `cut`: trials the search's end cut
    short (EndWatch.cut_short), by id."""
    p = Progress(total, prior_trial_s=prior_trial_s)
    seconds, cut = seconds or {}, cut or {}
    for t in trials:
        status = ERROR if t is failed else TERMINATED if t is ended else t.status
        secs = seconds.get(str(t.trial_id), (t.last_result or {}).get("time_total_s"))
        name = status_of(t, status, cut.get(str(t.trial_id), ""))
        if status in (ERROR, TERMINATED) and is_failure(name):  # errored, diverged, oom
            p.failed += 1
        elif status == TERMINATED and name in ENDED_BY_SEARCH:  # not finished: --resume continues it
            p.cut_short, p.cut_reason = p.cut_short + 1, name
        elif status == TERMINATED and name != NOT_STARTED:  # cleanup marks unstarted ones terminated too
            p.done += 1
            p.pruned += name == PRUNED
            if isinstance(secs, (int, float)):
                p.trial_seconds.append(float(secs))
        elif status == RUNNING:
            p.running += 1
            p.running_seconds.append(float(secs) if isinstance(secs, (int, float)) else 0.0)
        score = best_score(t)
        if score is not None and (p.best is None or score > p.best):
            p.best, p.best_trial = score, str(t.trial_id)
    return p


def progress_line(p: Progress, elapsed: float, parallel: int, budget_left: float | None = None) -> str:
    """The one-line summary; `budget_left`: seconds left of a --time-budget, which bounds the ETA."""
    total = "?" if p.total is None else str(p.total)
    parts = [f"{p.done + p.failed}/{total} trials finished",
             f"{p.running} running", f"{p.pruned} pruned", f"{p.failed} failed"]
    if p.cut_short:
        parts.append(f"{p.cut_short} {p.cut_reason}")
    parts += [f"best {METRIC} " + (f"{p.best:.4f} ({p.best_trial})" if p.best is not None else "-"),
              f"elapsed {duration(elapsed)}"]
    eta = p.eta(parallel)
    if p.cut_short:  # the search itself ended early
        parts.append("search interrupted: --resume continues it" if p.cut_reason == INTERRUPTED
                     else "search stopped: the time budget is spent")
    elif p.total is not None and p.done + p.failed >= p.total:
        parts.append("done")
    elif budget_left is not None:
        parts.append(f"time budget: {duration(budget_left if eta is None else min(eta, budget_left))} left")
    else:
        parts.append(f"about {duration(eta)} left" if eta is not None else "time left: known after the first trial ends")
    return "[search] " + " | ".join(parts)


class ProgressLine(EndWatch):
    """One overall progress line per trial end or failure, at most every `every_s` seconds, and
    one when the search ends."""

    def __init__(self, every_s: float = EVERY_S, out: Callable[[str], None] = print,
                 prior_trial_s: float | None = None, budget=None, exp=None):
        super().__init__(exp)
        # budget: a search.budget.BudgetStopper (its left()), when the search has a --time-budget
        self.prior_trial_s, self.budget = prior_trial_s, budget
        self.every_s, self.out = every_s, out
        self.total: int | None = None
        self.start = time.monotonic()
        self.last_print = self.start
        self.parallel = 1  # most trials seen running at once
        self.start_time: dict[str, float] = {}  # trial id -> monotonic start
        self.ended: dict[str, float] = {}  # trial id -> wall seconds it ran

    def __getstate__(self):  # Tune pickles callbacks with the experiment; `print` and clocks aside
        return {"every_s": self.every_s, "exp": self.exp}

    def __setstate__(self, state):
        self.__init__(**state)

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.total = total_num_samples if total_num_samples and total_num_samples < 10**9 else None
        self.start = self.last_print = time.monotonic()

    def _seconds(self) -> dict[str, float]:
        now = time.monotonic()
        return {**{k: now - t0 for k, t0 in self.start_time.items()}, **self.ended}

    def _print(self, trials, **which) -> None:
        p = progress_of(trials, self.total, seconds=self._seconds(), prior_trial_s=self.prior_trial_s, **which)
        which.pop("cut", None)
        self.parallel = max(self.parallel, p.running + bool(which))
        self.out(progress_line(p, time.monotonic() - self.start, self.parallel,
                               self.budget.left() if self.budget is not None else None))
        self.last_print = time.monotonic()

    def on_step_end(self, iteration: int, trials: list, **info):
        running = sum(t.status == RUNNING for t in trials)
        self.parallel = max(self.parallel, running)
        if running and time.monotonic() - self.last_print >= self.every_s:
            self._print(trials)

    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        super().on_trial_start(iteration, trials, trial)
        self.start_time.setdefault(str(trial.trial_id), time.monotonic())

    def _end(self, trial) -> None:
        t0 = self.start_time.pop(str(trial.trial_id), None)
        if t0 is not None:
            self.ended[str(trial.trial_id)] = time.monotonic() - t0

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        super().on_trial_complete(iteration, trials, trial)
        self._end(trial)
        self._print(trials, ended=trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        super().on_trial_error(iteration, trials, trial)
        self._end(trial)
        self._print(trials, failed=trial)

    def on_experiment_end(self, trials: list, **info):
        cut = self.cut_short(trials)
        if cut:  # Ctrl-C or the time budget: say how many trials it cut short
            self._print(trials, cut=cut)


# ---------------------------------------------------------------- the trial table

def table_rows(trials: list, params: list[str], metrics: list[str], max_rows: int = MAX_ROWS,
               cut: dict[str, str] | None = None) -> tuple[list[str], list[list[str]], int]:
    """(header, rows, trials left out): running trials first, then by best val_acc. `cut`: the
    trials the search's end cut short (EndWatch.cut_short), by id."""
    cut = cut or {}
    head = ["trial", "status"] + [SHORT.get(k, k) for k in params + metrics]
    order = {RUNNING: 0, TERMINATED: 1, "PAUSED": 2, "PENDING": 3, ERROR: 4}

    def key(t):
        score = best_score(t)
        return order.get(t.status, 5), -(score if score is not None else -1.0)
    rows = []
    for t in sorted(trials, key=key):
        status = status_of(t, ended_by_search=cut.get(str(t.trial_id), ""))
        cfg, res = t.config or {}, t.last_result or {}
        rows.append([str(t.trial_id), status]
                    + param_cells(cfg, params)
                    + [fmt(res.get(k)) for k in metrics])
    return head, rows[:max_rows], max(0, len(rows) - max_rows)


def render_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


class TrialTable(EndWatch):
    """The live trial table with fixed columns: every `every_s` seconds while trials run, and once
    at the end, where trials the search's end cut short show as interrupted or out of time budget.
    A plain callback, not a second Tune terminal reporter: Ray 2.60 sets up only the first
    reporter's clock, and its own (then second) reporter crashes when a trial fails."""

    def __init__(self, params: list[str] | None = None, metrics: list[str] | None = None,
                 every_s: float = EVERY_S, max_rows: int = MAX_ROWS, out: Callable[[str], None] = print,
                 exp=None):
        super().__init__(exp)
        self.params, self.metrics = list(params or PARAM_COLUMNS), list(metrics or METRIC_COLUMNS)
        self.every_s, self.max_rows, self.out = every_s, max_rows, out
        self.start = self.last_print = time.monotonic()

    def __getstate__(self):  # Tune pickles callbacks with the experiment; `print` and clocks aside
        return {"params": self.params, "metrics": self.metrics, "every_s": self.every_s,
                "max_rows": self.max_rows, "exp": self.exp}

    def __setstate__(self, state):
        self.__init__(**state)

    def setup(self, **info):
        self.start = self.last_print = time.monotonic()

    def on_step_end(self, iteration: int, trials: list, **info):
        if trials and time.monotonic() - self.last_print >= self.every_s:
            self._print(trials)

    def on_experiment_end(self, trials: list, **info):
        self._print(trials, everything=True)

    def _print(self, trials: list, everything: bool = False) -> None:
        cut = self.cut_short(trials) if everything else {}
        head, rows, more = table_rows(trials, self.params, self.metrics,
                                      max_rows=len(trials) if everything else self.max_rows, cut=cut)
        counts: dict[str, int] = {}
        for tr in trials:
            name = status_of(tr, ended_by_search=cut.get(str(tr.trial_id), ""))
            counts[name] = counts.get(name, 0) + 1
        status = " | ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        lines = [f"Trial status: {status} | elapsed {duration(time.monotonic() - self.start)}",
                 render_table(head, rows)] + ([f"... and {more} more trials"] if more else [])
        self.out("\n".join(lines))
        self.last_print = time.monotonic()


# ---------------------------------------------------------------- wiring

class _DropLines(logging.Filter):
    """Drops a Ray log record that contradicts this console (see quiet_ray_console)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "Resume experiment with:" in msg:  # Tuner.restore(...): run.py prints the --resume command
            return False
        if msg.startswith("Failed to fetch metrics"):  # kept unless every trial named never started
            fails = [ln for ln in msg.splitlines()[1:] if ln.startswith("- ")]
            return not fails or not all("FileNotFoundError" in ln for ln in fails)
        return True


_FILTER = _DropLines()
_FILTERED_LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")


def quiet_ray_console() -> None:
    """Keep Ray Tune from printing what contradicts this console, and keep the rest of its output.

    - Ray's default ("new") console engine prints, whatever the verbosity, a start-up table with
      `Number of trials 9223372036854775807` for an unbounded --time-budget search (its own check
      for "infinite" is off by one) and a TensorBoard command for its staging folder under
      /tmp/ray, not the experiment. Its legacy engine (RAY_AIR_NEW_OUTPUT=0, the switch Ray and
      RLlib document) prints nothing at verbose=0 but the trial errors it logs, so it is chosen.
    - After Ctrl-C it logs `Resume experiment with: Tuner.restore(...)`; the CLI prints the
      run_search.py --resume command instead.
    - When the search ends it warns `Failed to fetch metrics` for trials that never started (no
      result file yet); the summary lists them as "not started". Other fetch failures still show.
    """
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name in _FILTERED_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


@dataclass
class Console:
    callbacks: list
    verbose: int
    progress_reporter: Any


def console(every_s: float = EVERY_S, prior_trial_s: float | None = None, budget=None, exp=None) -> Console:
    """What RunConfig needs for this console (Ray's own console silenced: quiet_ray_console).
    `exp`: the experiment folder, where the final table reads whether a spent --time-budget ended
    the search."""
    quiet_ray_console()
    line = ProgressLine(every_s, prior_trial_s=prior_trial_s, budget=budget, exp=exp)
    return Console([TrialTable(every_s=every_s, exp=exp), line], verbose=0, progress_reporter=None)
