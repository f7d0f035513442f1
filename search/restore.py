"""Resuming a search: what Ray Tune 2.60's `Tuner.restore` gets wrong, put right. It saves the searcher but not
ASHA's rungs (ray-project/ray#30838: every trial's result.json replayed rebuilds them exactly), restored trials
escape `max_concurrent_trials` (ray-project/ray#40652), the restored searcher creates trials where the experiment
was pickled, the pickled callbacks and stopper name the folder the search began in, and a kill while Tune writes its
trials, its searcher and its trial count (one file after another, uploaded file by file) restores them out of step
with each other and with the study: the searcher is made to follow Tune's trials (FidelitySearch.follow)."""
from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.utils import flatten_dict

from analysis.cloud import parent_and_name
from analysis.experiment import load_trials
from analysis.outcome import on_a_fraction
from search import ray_adapter
from search.storage import Place


class ConcurrencyCap(TrialScheduler):
    """Runs `inner` (ASHA or FIFO) but never more than `limit` trials at once, restored ones too."""

    def __init__(self, inner: TrialScheduler, limit: int):
        super().__init__()
        self.inner, self.limit = inner, limit

    metric = property(lambda self: self.inner.metric)
    supports_buffered_results = property(lambda self: self.inner.supports_buffered_results)

    def _active(self, tune_controller: Any, besides: Trial | None = None) -> int:
        return sum(1 for t in tune_controller.get_trials()
                   if t is not besides and t.status in (Trial.RUNNING, Trial.PENDING))

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self.inner.on_trial_add(tune_controller, trial)
        # the controller files the trial under its status after this call: PAUSED waits for
        # choose_trial_to_run, PENDING would start at once
        if trial.status == Trial.PENDING and self._active(tune_controller, trial) >= self.limit:
            trial.set_status(Trial.PAUSED)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        if self._active(tune_controller) >= self.limit:
            return None
        return self.inner.choose_trial_to_run(tune_controller)


def _delegate(name: str):
    return lambda self, *args, **kwargs: getattr(self.inner, name)(*args, **kwargs)


# everything else is the inner scheduler's
for _name in ("set_search_properties", "on_trial_error", "on_trial_result", "on_trial_complete",
              "on_trial_remove", "debug_string", "save", "restore"):
    setattr(ConcurrencyCap, _name, _delegate(_name))


class SearchHere(SearchGenerator):
    """The restored searcher wrapped as Tune wraps it (in a ConcurrencyLimiter for `max_concurrent` > 0), whose
    restored state creates new trials at `exp` (a folder or a URI)."""

    def __init__(self, searcher: Any, max_concurrent: int, exp: str):
        super().__init__(ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent > 0 else searcher)
        self.exp, self.here = str(exp), parent_and_name(exp)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        ray_adapter.move_storage(self, *self.here)

    def restore_from_dir(self, dirpath: str) -> None:
        """Restored, then made to agree with the trials Tune restored from the experiment (a kill between
        Tune's writes leaves the searcher's state a trial ahead of them or behind): the restored unfinished
        trials are the concurrency limit's live ones, the searcher follows each, and the trials it counts
        as started are those Tune and the study have."""
        super().restore_from_dir(dirpath)
        trials = ray_adapter.restored_trials(self.exp)
        live = {t.trial_id for t in trials if t.status != Trial.TERMINATED}  # errored ones run again
        ended = {t.trial_id: flatten_dict(t.last_result) for t in trials if t.status == Trial.TERMINATED}
        searcher = self.searcher
        if isinstance(searcher, ConcurrencyLimiter):
            searcher.live_trials = set(live)
            searcher = searcher.searcher
        self.set_state({**self.get_state(), "counter": searcher.follow(live, ended)})


def asha_results(exp: Any) -> dict[str, list[dict[str, Any]]]:
    """{trial id: its results} of the experiment's full-fidelity trials (screen trials are no record in the live
    FullFidelityASHA's rungs either)."""
    return {t.trial_id: t.results for t in load_trials(exp) if not on_a_fraction(t.config)}


def restore_tuner(place: Place, trainable: Any, max_concurrent: int, callbacks: list, stop: Any) -> Any:
    """`Tuner.restore` of the experiment at `place` with ASHA's rungs rebuilt from the results in its local folder,
    the concurrency limit (0 = none) holding for restored trials too, and this run's `callbacks` and `stop`."""
    tuner = tune.Tuner.restore(place.tune_path, trainable=trainable, resume_errored=True)
    configs = ray_adapter.configs(tuner)
    if configs is None:
        print("warning: resuming through Ray Client: ASHA starts with empty rungs and "
              "--max-concurrent may be exceeded by restored trials")
        return tuner
    tc, rc = configs
    rc.callbacks, rc.stop = callbacks, stop
    # tuner.pkl holds the searcher as make_searcher made it: Tune would wrap it itself, without SearchHere
    tc.search_alg, tc.max_concurrent_trials = SearchHere(tc.search_alg, max_concurrent, place.tune_path), None
    if isinstance(tc.scheduler, AsyncHyperBandScheduler):
        rungs = ray_adapter.rebuild_asha(tc.scheduler, asha_results(place.exp))
        print("resume: ASHA's rungs rebuilt from the results on disk: "
              + ", ".join(f"epoch {m:g}: {n} trials" for m, n in sorted(rungs.items())))
    if max_concurrent > 0:
        tc.scheduler = ConcurrencyCap(tc.scheduler, max_concurrent)
        print(f"resume: at most {max_concurrent} trial(s) at once, restored ones included (--max-concurrent)")
    return tuner
