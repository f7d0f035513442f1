"""Resuming a search: the two things Ray Tune 2.60's `Tuner.restore` gets wrong, put right.

1. ASHA's rungs. Tune saves the searcher with the experiment but not the scheduler: the restored
   Tuner takes the scheduler pickled in `tuner.pkl` when the search began, with empty rungs
   (ray-project/ray#30838). The rungs are rebuilt here by replaying every trial's `result.json`.
   A rung holds each trial's first result at or past the rung's epoch, which depends only on
   that trial's own results, so the replay gives exactly the rungs the uninterrupted search had.
2. `max_concurrent_trials`. It is enforced only by the searcher's ConcurrencyLimiter, on new
   trials; restored trials all go PENDING at once and start together (ray-project/ray#40652).
   `ConcurrencyCap` parks the trials over the limit as PAUSED, which Tune starts only when the
   scheduler chooses them, and chooses one when a slot frees.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator

from search.storage import filesystem_and_path, is_uri, split_query


def read_results(exp: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Every trial's results in the order it reported them: {trial_id: [result, ...]}.

    `exp` is a local folder or a pyarrow URI (s3://..., gs://...). A half-written last line
    (the driver killed mid-write) is skipped.
    """
    import pyarrow.fs

    fs, root = filesystem_and_path(str(exp))
    out: dict[str, list[dict[str, Any]]] = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        if info.type != pyarrow.fs.FileType.Directory:
            continue
        path = f"{info.path}/result.json"
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            continue
        with fs.open_input_stream(path) as f:
            lines = f.read().decode("utf-8", errors="replace").splitlines()
        for line in lines:
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(result, dict) and "trial_id" in result:
                out.setdefault(str(result["trial_id"]), []).append(result)
    return out


def rebuild_asha(scheduler: AsyncHyperBandScheduler,
                 results: dict[str, list[dict[str, Any]]]) -> dict[float, int]:
    """Record every result in ASHA's rungs as the live scheduler did; returns {rung: trials}.

    The scheduler must be the one the search began with (same max_t, grace period, reduction
    factor, metric and mode) and have seen no result yet.
    """
    time_attr, metric, op = scheduler._time_attr, scheduler._metric, scheduler._metric_op
    if op is None:
        raise ValueError("ASHA has no metric/mode: it can't rank the results it is given")
    # run_search's ASHA has one bracket; with several, Tune assigns trials to them at random
    # and does not save which, so there is nothing to replay them into
    if len(scheduler._brackets) != 1:
        raise ValueError(f"can only rebuild a one-bracket ASHA, not {len(scheduler._brackets)}")
    bracket = scheduler._brackets[0]
    for trial_id, rows in results.items():
        trial = SimpleNamespace(trial_id=trial_id)  # the bracket reads nothing else of a Trial
        for r in rows:
            t, value = r.get(time_attr), r.get(metric)
            if not _is_number(t) or not _is_number(value):
                continue  # as Tune's ASHA: a result without the time or the metric is no decision
            # results at max_t are recorded too: the live ASHA records them on trial completion
            bracket.on_result(trial, t, op * value)
    return {milestone: len(recorded) for milestone, recorded in bracket._rungs}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isinf(x)


class ConcurrencyCap(TrialScheduler):
    """Runs `inner` (ASHA or FIFO) but never more than `limit` trials at once, restored ones too."""

    def __init__(self, inner: TrialScheduler, limit: int):
        super().__init__()
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        self.inner, self.limit = inner, limit

    def _active(self, tune_controller: Any, besides: Trial | None = None) -> int:
        return sum(1 for t in tune_controller.get_trials()
                   if t is not besides and t.status in (Trial.RUNNING, Trial.PENDING))

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self.inner.on_trial_add(tune_controller, trial)
        # The controller files the trial under its status right after this call: a PAUSED
        # trial waits for choose_trial_to_run, a PENDING one would be started at once
        if trial.status == Trial.PENDING and self._active(tune_controller, trial) >= self.limit:
            trial.set_status(Trial.PAUSED)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        if self._active(tune_controller) >= self.limit:
            return None
        return self.inner.choose_trial_to_run(tune_controller)

    # everything else is the inner scheduler's
    @property
    def metric(self) -> str | None:
        return self.inner.metric

    @property
    def supports_buffered_results(self) -> bool:
        return self.inner.supports_buffered_results

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, **spec)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.inner.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        return self.inner.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self.inner.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.inner.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return self.inner.debug_string()

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)


class SearchHere(SearchGenerator):
    """Tune's SearchGenerator, but a restored one creates its new trials where the experiment is
    now: Tune restores the generator's Experiment as pickled when the search began, storage path
    and name included, so after a move new trials wrote to the old place (its existing trials Tune
    restores at the new one)."""

    def __init__(self, searcher: Any, storage_path: str, name: str):
        super().__init__(searcher)
        self.here = (storage_path, name)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        old = getattr(self._experiment, "storage", None)
        if old is None or (str(old.storage_fs_path), old.experiment_dir_name) == self.here:
            return
        from ray.train._internal.storage import StorageContext
        new = StorageContext(storage_path=self.here[0], experiment_dir_name=self.here[1],
                             sync_config=old.sync_config)
        # in place: the experiment's spec holds the same object; its session timestamp stays
        for attr in ("storage_filesystem", "storage_fs_path", "experiment_dir_name", "syncer"):
            setattr(old, attr, getattr(new, attr))


def search_here(search_alg: Any, max_concurrent: int, exp: str | Path) -> SearchHere:
    """The restored searcher wrapped as Tune wraps it (ConcurrencyLimiter when --max-concurrent,
    then SearchGenerator), as a SearchHere for the experiment at `exp` (a folder or a URI)."""
    while isinstance(search_alg, (SearchGenerator, ConcurrencyLimiter)):
        search_alg = search_alg.searcher
    if max_concurrent > 0:
        search_alg = ConcurrencyLimiter(search_alg, max_concurrent=max_concurrent)
    if is_uri(str(exp)):
        base, query = split_query(str(exp))
        parent, name = base.rsplit("/", 1)
        return SearchHere(search_alg, parent + query, name)
    return SearchHere(search_alg, str(Path(exp).parent), Path(exp).name)


def rebind_folder(obj: Any, exp: Path) -> None:
    """Point an object pickled with the experiment (a callback, the stopper) whose `exp` names the
    folder it was saved in at `exp`, through its own pickling hooks (they rebuild what depends on it:
    the budget stopper rereads the time spent). Tune restores an experiment from where it is now
    (ray-project/ray#40647) but the objects pickled in tuner.pkl keep their old absolute paths."""
    old = getattr(obj, "exp", None)
    if not isinstance(old, Path) or old == exp:
        return
    state = obj.__reduce_ex__(2)[2]  # what pickle saved: __getstate__'s result or __dict__
    state = {**(state or {}), "exp": exp}
    if hasattr(obj, "__setstate__"):
        obj.__setstate__(state)
    else:
        obj.__dict__.update(state)


def restore_tuner(exp: str | Path, trainable: Any, max_concurrent: int, local: Path | None = None) -> Any:
    """`Tuner.restore` of the experiment at `exp` with ASHA's rungs rebuilt and the concurrency
    limit (0 = none) holding for restored trials too; the callbacks and stopper pickled with it
    write to `local` (the experiment's local folder, wherever it is now)."""
    from ray import tune

    tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_errored=True)
    # Tuner.restore takes no scheduler; the restored run uses the one unpickled from tuner.pkl
    # into the internal TuneConfig, so that is where the rebuilt one goes
    internal = getattr(tuner, "_local_tuner", None)
    if internal is None:  # Ray Client: the tuner lives in a remote actor
        print("warning: resuming through Ray Client: ASHA starts with empty rungs and "
              "--max-concurrent may be exceeded by restored trials")
        return tuner
    if local is not None:
        rc = internal._run_config
        for obj in [*(rc.callbacks or []), rc.stop]:
            rebind_folder(obj, Path(local))
    tc = internal._tune_config
    if tc.search_alg is not None:  # Tune would wrap it itself, without SearchHere's fix
        tc.search_alg, tc.max_concurrent_trials = search_here(tc.search_alg, tc.max_concurrent_trials or 0, exp), None
    scheduler = internal._tune_config.scheduler
    if isinstance(scheduler, AsyncHyperBandScheduler):
        rungs = rebuild_asha(scheduler, read_results(exp))
        print("resume: ASHA's rungs rebuilt from the results on disk: "
              + ", ".join(f"epoch {m:g}: {n} trials" for m, n in sorted(rungs.items())))
    if max_concurrent > 0 and scheduler is not None:
        internal._tune_config.scheduler = ConcurrencyCap(scheduler, max_concurrent)
        print(f"resume: at most {max_concurrent} trial(s) at once, restored ones included (--max-concurrent)")
    return tuner

