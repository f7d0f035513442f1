"""Every use of Ray Tune's private attributes, in one place (tests/test_ray_adapter.py checks each on
the installed Ray, naming the attribute a new version changed).

Tune 2.60 has no public way to: rebuild ASHA's rungs after `Tuner.restore` (ray-project/ray#30838),
give a restored Tuner a scheduler, callbacks or stopper of this run, move a restored searcher's
experiment to where the folder is now, or tell Optuna a trial's state other than COMPLETE.
"""
from __future__ import annotations

from typing import Any

import ray
from ray.train._internal.storage import StorageContext


class RayChanged(RuntimeError):
    """The installed Ray lacks a private attribute this module relies on."""


def _get(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RayChanged(f"Ray {ray.__version__}: {type(obj).__name__} has no attribute {name!r}; "
                         f"search/ray_adapter.py must follow the new version") from None


def local_tuner(tuner: Any) -> Any | None:
    """The TunerInternal of a Tuner (None through Ray Client, where it lives in a remote actor)."""
    return None if "_remote_tuner" in vars(tuner) else _get(tuner, "_local_tuner")


def tune_config(tuner: Any) -> Any:
    """The restored TuneConfig: where Tune unpickled the scheduler and searcher of tuner.pkl."""
    return _get(local_tuner(tuner), "_tune_config")


def run_config(tuner: Any) -> Any:
    return _get(local_tuner(tuner), "_run_config")


def asha_bracket(scheduler: Any) -> tuple[Any, str, str, float | None]:
    """(the one bracket, time attribute, metric, metric sign) of an AsyncHyperBandScheduler."""
    brackets = _get(scheduler, "_brackets")
    if len(brackets) != 1:  # Tune assigns trials to brackets at random and saves not which
        raise ValueError(f"can only rebuild a one-bracket ASHA, not {len(brackets)}")
    return brackets[0], _get(scheduler, "_time_attr"), _get(scheduler, "_metric"), _get(scheduler, "_metric_op")


def rung_sizes(bracket: Any) -> dict[float, int]:
    """{milestone: trials recorded} of an ASHA bracket."""
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
