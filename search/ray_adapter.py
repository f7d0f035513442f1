"""Every use of Ray Tune's private attributes, in one place (tests/test_ray_adapter.py checks each on the installed
Ray, naming any a new version changed). Tune 2.60 has no public way to rebuild ASHA's rungs, reach a restored Tuner's
configs, move a restored searcher's experiment, read the trials a resume restores, or tell Optuna a trial state
other than COMPLETE."""
from __future__ import annotations

import math
import re
from types import SimpleNamespace
from typing import Any

import ray
from ray.train._internal.storage import StorageContext, get_fs_and_path
from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
from ray.tune.experiment import Trial
from ray.tune.utils.serialization import _loads_with_cloudpickle


def memory_killed(e: BaseException) -> str | None:
    """"X GB used / Y GB" when `e` is Ray's memory monitor killing a worker (an OutOfMemoryError that stops Tune
    2.60; its text is all that tells it apart), "RAM full" if the numbers are missing; else None."""
    if "killed due to the node running low on memory" not in str(e):
        return None
    used = re.search(r"was ([\d.]+GB used / [\d.]+GB)", str(e))
    return used.group(1) if used else "RAM full"


class RayChanged(RuntimeError):
    """The installed Ray lacks a private attribute this module relies on."""


def _get(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RayChanged(f"Ray {ray.__version__}: {type(obj).__name__} has no attribute {name!r}; "
                         f"search/ray_adapter.py must follow the new version") from None


def configs(tuner: Any) -> tuple[Any, Any] | None:
    """(TuneConfig, RunConfig) of a Tuner, where `Tuner.restore` unpickled the scheduler, searcher, callbacks
    and stopper; None through Ray Client, where the Tuner lives in a remote actor."""
    if "_remote_tuner" in vars(tuner):
        return None
    local = _get(tuner, "_local_tuner")
    return _get(local, "_tune_config"), _get(local, "_run_config")


def rebuild_asha(scheduler: Any, results: dict[str, list[dict[str, Any]]]) -> dict[float, int]:
    """Record every result ({trial_id: [result, ...]}) in the rungs of a fresh ASHA with the search's own
    settings, as the live scheduler did; returns {rung: trials}."""
    bracket = _get(scheduler, "_brackets")[0]  # one bracket: Tune assigns trials to brackets at random, saving not which
    time_attr, metric, op = _get(scheduler, "_time_attr"), _get(scheduler, "_metric"), _get(scheduler, "_metric_op")
    for trial_id, rows in results.items():
        trial = SimpleNamespace(trial_id=trial_id)  # the bracket reads nothing else of a Trial
        for r in rows:
            t, value = r.get(time_attr), r.get(metric)
            # as Tune's ASHA: a result without a finite time and a number is no decision
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isinf(x) for x in (t, value)):
                bracket.on_result(trial, t, op * value)
    return {milestone: len(recorded) for milestone, recorded in _get(bracket, "_rungs")}


def move_storage(generator: Any, storage_path: str, name: str) -> None:
    """Point a restored SearchGenerator's experiment (pickled with its old storage path and name) at
    `storage_path`/`name`, in place: the experiment's spec holds the same object."""
    old = getattr(_get(generator, "_experiment"), "storage", None)
    if old is None or (str(old.storage_fs_path), old.experiment_dir_name) == (storage_path, name):
        return
    new = StorageContext(storage_path=storage_path, experiment_dir_name=name, sync_config=old.sync_config)
    for attr in ("storage_filesystem", "storage_fs_path", "experiment_dir_name", "syncer"):
        setattr(old, attr, getattr(new, attr))


def optuna_state(search: Any) -> tuple[Any, dict[str, Any], set[str]]:
    """(the Optuna study, {Tune trial id: Optuna trial}, Tune ids already told) of an OptunaSearch."""
    return _get(search, "_ot_study"), _get(search, "_ot_trials"), _get(search, "_completed_trials")


def driver_staging_path(trial: Any) -> str | None:
    """The driver's staging folder Tune uploads its experiment state from (None before it exists)."""
    return getattr(getattr(trial, "storage", None), "experiment_driver_staging_path", None)


def restored_trials(experiment_path: str) -> list[Any]:
    """The trials Tune's resume restores from the experiment at `experiment_path` (a folder or a URI): its newest
    experiment state, found and read as `TuneController.resume` does, as stub Trials with `trial_id`, `status`
    and `last_result`."""
    fs, fs_path = get_fs_and_path(experiment_path)
    newest = _find_newest_experiment_checkpoint(fs_path, fs=fs)
    if newest is None:
        return []
    with fs.open_input_stream(newest) as f:
        state = _loads_with_cloudpickle(f.readall())
    trials = []
    for json_state, metadata in state["trial_data"]:
        trial = Trial.from_json_state(json_state, stub=True)
        trial.restore_run_metadata(metadata)
        trials.append(trial)
    return trials
