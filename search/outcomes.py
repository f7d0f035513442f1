"""Live Ray Tune trials seen through analysis.outcome's rule, and the record of trials the search's
own end cut short (Ctrl-C, a spent --time-budget), which nothing in a trial's folder tells apart
from ASHA pruning it: Tune marks them all TERMINATED, and only pruning calls on_trial_complete.
"""
from __future__ import annotations

from pathlib import Path

from ray import tune

from analysis.outcome import INTERRUPTED, OUT_OF_BUDGET, TrialView, write_ends
from search.budget import exhausted


def live_view(trial, status: str | None = None, ended_by_search: str = "") -> TrialView:
    """`trial` (a ray.tune Trial) as the outcome rule sees it; `status` overrides its Tune status
    (a callback hears of a trial's end before Tune updates it)."""
    status = status or trial.status
    return TrialView(trial.config or {}, trial.last_result or {}, errored=status == "ERROR",
                     live=status, ended_by_search=ended_by_search)


def end_reason(exp: Path | None) -> str:
    """Why the search ended with trials still running: its --time-budget ran out, else it was
    interrupted (Ctrl-C, SIGUSR1)."""
    return OUT_OF_BUDGET if exp is not None and exhausted(exp) else INTERRUPTED


class EndWatch(tune.Callback):
    """Tracks which trials started and which ended by themselves or by the scheduler; those left
    at the experiment's end were cut short by it."""

    def __init__(self, exp: Path | None = None):
        self.exp = Path(exp) if exp is not None else None
        self.started: set[str] = set()
        self.finished: set[str] = set()

    def __getstate__(self):  # Tune pickles callbacks with the experiment; a resume starts afresh
        return {"exp": self.exp}

    def __setstate__(self, state):
        EndWatch.__init__(self, state.get("exp"))

    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        self.started.add(str(trial.trial_id))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        self.finished.add(str(trial.trial_id))

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        self.finished.add(str(trial.trial_id))

    def cut_short(self, trials: list) -> dict[str, str]:
        """{trial_id: INTERRUPTED | OUT_OF_BUDGET} for the started trials that never ended."""
        reason = end_reason(self.exp)
        return {str(t.trial_id): reason for t in trials
                if str(t.trial_id) in self.started - self.finished and t.status != "ERROR"}


class TrialEnds(EndWatch):
    """Writes the cut-short trials to the experiment's trial_ends.json for the read side."""

    def on_experiment_end(self, trials: list, **info):
        if self.exp is not None:
            write_ends(self.exp, self.cut_short(trials), self.finished)
