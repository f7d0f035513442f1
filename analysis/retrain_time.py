"""How long analyze.py's retrain will take: the selected trial's own epoch times in the search,
scaled to the retrain's training images, and an ETA that corrects them by the epochs done so far."""
from __future__ import annotations

from analysis.experiment import TrialRecord

EPOCH_TIME = "time_this_iter_s"  # Tune's wall seconds between a trial's reports: one epoch, validation included


def expected_epochs(trial: TrialRecord, epochs: int, scale: float) -> list[float] | None:
    """Seconds of each of the retrain's first `epochs` epochs: the trial's time for the same epoch
    (the same stage plan) times `scale` (retrain training images / the trial's). An epoch the
    trial never ran (pruned or cut before it) takes its last epoch's time. None when the trial
    has no timed epoch."""
    times: dict[int, float] = {}
    for r in trial.results:  # a trial restarted from a checkpoint reports an epoch again: the last counts
        if isinstance(r.get("epoch"), int) and isinstance(r.get(EPOCH_TIME), (int, float)):
            times[r["epoch"]] = float(r[EPOCH_TIME])
    if not times:
        return None
    out, last = [], times[min(times)]
    for e in range(1, epochs + 1):
        last = times.get(e, last)
        out.append(last * scale)
    return out


class Eta:
    """Seconds left of a retrain of `total` epochs after some are done: the planned seconds of the
    epochs left, scaled by how the done ones compared with their plan (this machine may run the
    retrain faster than trials that shared it); without a plan, the mean epoch so far."""

    def __init__(self, planned: list[float] | None, total: int):
        self.planned, self.total = planned, total

    def left(self, done: int, elapsed: float) -> float | None:
        if done <= 0:
            return sum(self.planned) if self.planned else None
        if self.planned and sum(self.planned[:done]) > 0:
            return elapsed / sum(self.planned[:done]) * sum(self.planned[done:])
        return elapsed / done * max(0, self.total - done)
