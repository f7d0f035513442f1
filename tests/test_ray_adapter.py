"""search/ray_adapter.py against the installed Ray: each private attribute it reaches for is there
(a Ray upgrade that renamed one fails here, naming it, not silently in a resumed search). No Ray starts."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray import tune
from ray.train._internal.storage import StorageContext
from ray.tune.experiment import Experiment
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from search import ray_adapter
from search.searcher import make_scheduler


def _trainable(config):
    pass


def test_a_missing_attribute_names_itself():
    with pytest.raises(ray_adapter.RayChanged, match="'_brackets'.*search/ray_adapter.py"):
        ray_adapter.rebuild_asha(SimpleNamespace(), {})


def test_asha_rungs_rebuilt():
    asha = make_scheduler("asha", 9, 1, 3)
    assert ray_adapter.rebuild_asha(asha, {"a": [{"epoch": 1, "val_acc": 0.5}]})[1] == 1
    assert asha._brackets[0]._rungs[-1][1] == {"a": 0.5}  # recorded as the live ASHA records it


def test_a_tuners_configs(tmp_path):
    tuner = tune.Tuner(_trainable, tune_config=tune.TuneConfig(num_samples=3),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="e"))
    tune_config, run_config = ray_adapter.configs(tuner)
    assert tune_config.num_samples == 3 and run_config.name == "e"


def test_a_restored_searchers_experiment_moves(tmp_path):
    gen = SearchGenerator(OptunaSearch(space=lambda t: {"a": t.suggest_float("a", 0, 1)}, metric="m", mode="max"))
    gen.add_configurations([Experiment("old", _trainable, storage_path=str(tmp_path / "was"))])
    ray_adapter.move_storage(gen, str(tmp_path / "now"), "new")
    storage = gen._experiment.storage
    assert (storage.storage_fs_path, storage.experiment_dir_name) == (str(tmp_path / "now"), "new")


def test_optuna_search_state():
    study, ot_trials, told = ray_adapter.optuna_state(
        OptunaSearch(space=lambda t: {"a": t.suggest_float("a", 0, 1)}, metric="m", mode="max"))
    assert study is not None and ot_trials == {} and told == set()


def test_the_driver_staging_folder():
    assert isinstance(StorageContext.experiment_driver_staging_path, property)  # needs Ray to be read
    assert ray_adapter.driver_staging_path(SimpleNamespace()) is None


def test_the_trials_a_resume_restores(tmp_path):
    import json

    from ray.tune import PlacementGroupFactory
    from ray.tune.experiment import Trial
    from ray.tune.utils.serialization import TuneFunctionEncoder
    trial = Trial("t", stub=True, trial_id="abc", config={"lr": 0.1})
    trial.placement_group_factory = PlacementGroupFactory([{"CPU": 1}])  # a stub has none; Tune's trials do
    trial.set_status(Trial.TERMINATED)
    trial.run_metadata.last_result = {"val_acc": 0.5}
    state = {"trial_data": [trial.get_json_state()], "runner_data": {}, "stats": {}}
    for stamp, data in (("2026-01-01_00-00-00", {**state, "trial_data": []}), ("2026-01-02_00-00-00", state)):
        (tmp_path / f"experiment_state-{stamp}.json").write_text(json.dumps(data, cls=TuneFunctionEncoder))
    [restored] = ray_adapter.restored_trials(str(tmp_path))  # the newest state, as Tune's resume picks it
    assert (restored.trial_id, restored.status, restored.last_result["val_acc"]) == ("abc", Trial.TERMINATED, 0.5)
    assert ray_adapter.restored_trials(str(tmp_path / "none")) == []
