"""search/tensorboard.py: per-trial scalars against the global epoch and HParams, read back with
TensorBoard's own reader."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
from ray.tune.logger import TBXLoggerCallback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from search.tensorboard import HPARAMS, SCALARS, EpochTensorBoard
from trainable.config import TrialConfig


class FakeTrial:
    """The parts of ray.tune.experiment.Trial the callback uses."""

    def __init__(self, trial_id: str, root: Path, **config):
        self.trial_id = trial_id
        self.config = TrialConfig.from_dict(config).to_dict()
        self.local_path = str(root / f"trial_{trial_id}")

    def init_local_path(self):
        Path(self.local_path).mkdir(parents=True, exist_ok=True)


def result(epoch: int, stage: int, val_acc: float, **extra) -> dict:
    return {"epoch": epoch, "stage": stage, "lr": 0.01 / epoch, "train_loss": 2.0 / epoch,
            "val_acc": val_acc, "val_loss": 1.0 / epoch, "best_val_acc": val_acc,
            "training_iteration": 100 + epoch,  # deliberately not the epoch: the step must be the epoch
            "config": {"nested": "ignored"}, **extra}


def read(run_dir: str) -> EventAccumulator:
    ea = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def session(ea: EventAccumulator) -> tuple[dict, int]:
    """(hparams, end status) of the run's HParams session."""
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    hp = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.session_start_info.hparams.items()}
    return hp, end.session_end_info.status


@pytest.fixture
def logged(tmp_path):
    cb = EpochTensorBoard()
    done = FakeTrial("a", tmp_path, stage1_epochs=1, stage2_epochs=2, stage1_lr=0.05, backbone="resnet18")
    stopped = FakeTrial("b", tmp_path, stage1_epochs=1, stage2_epochs=2, stage1_lr=0.001)
    failed = FakeTrial("c", tmp_path, stage1_epochs=1, stage2_epochs=2)
    for t in (done, stopped, failed):
        cb.log_trial_start(t)
    for e, (stage, acc) in enumerate([(1, 0.2), (2, 0.35), (2, 0.3)], start=1):
        cb.log_trial_result(100 + e, done, result(e, stage, acc, best_val_acc=max(0.2, 0.35 if e > 1 else 0.2)))
    cb.log_trial_result(1, stopped, result(1, 1, 0.05, val_loss=math.nan))
    cb.log_trial_result(1, failed, result(1, 1, 0.1))
    cb.log_trial_end(done)
    cb.log_trial_end(stopped)
    cb.log_trial_end(failed, failed=True)
    return done, stopped, failed


def test_scalars_are_against_the_global_epoch(logged):
    done, stopped, _ = logged
    ea = read(done.local_path)
    tags = set(ea.Tags()["scalars"])
    assert tags <= set(SCALARS) and {"val_acc", "val_loss", "lr"} <= tags  # no ray/tune/* duplicates, no config noise
    for tag in ("val_acc", "val_loss", "train_loss", "lr", "stage"):
        assert [e.step for e in ea.Scalars(tag)] == [1, 2, 3]
    assert [e.value for e in ea.Scalars("stage")] == [1, 2, 2]
    assert [round(e.value, 4) for e in ea.Scalars("val_acc")] == [0.2, 0.35, 0.3]
    assert ea.Scalars("best_val_acc")[-1].value == pytest.approx(0.35)
    assert "val_loss" not in read(stopped.local_path).Tags()["scalars"]  # NaN is left out


def test_hparams_session_per_trial(logged):
    done, stopped, failed = logged
    hp, status = session(read(done.local_path))
    assert set(hp) == set(HPARAMS) | {"status"}
    assert hp["backbone"] == "resnet18" and hp["stage1_lr"] == pytest.approx(0.05)
    assert hp["status"] == "completed" and status == api_pb2.Status.STATUS_SUCCESS
    hp, status = session(read(stopped.local_path))
    assert hp["status"] == "pruned" and status == api_pb2.Status.STATUS_SUCCESS
    hp, status = session(read(failed.local_path))
    assert hp["status"] == "errored" and status == api_pb2.Status.STATUS_FAILURE
    assert not {"weights_dir", "seed", "precision"} & set(hp)  # plumbing, not hyper-parameters


def test_replaces_tunes_default_logger_and_pickles():
    """A TBXLoggerCallback subclass, so Tune adds no second TensorBoard logger; Tune pickles it."""
    cb = EpochTensorBoard(exp=Path("exp"))
    assert isinstance(cb, TBXLoggerCallback)
    again = pickle.loads(pickle.dumps(cb))
    assert again.exp == Path("exp") and again.writers == {}
