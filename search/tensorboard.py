"""TensorBoard for a search: per trial, the epoch metrics against the global epoch and one HParams session (its
hyper-parameters and outcome) when it ends. It replaces Tune's TBXLoggerCallback (a subclass: Tune adds no second
one), which logs every key against `training_iteration` and has no outcome in HParams."""
from __future__ import annotations

import math
import time
from dataclasses import fields
from pathlib import Path

import pyarrow.fs
from ray.tune.logger import TBXLoggerCallback
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from torch.utils.tensorboard import SummaryWriter

from analysis.outcome import OUT_OF_BUDGET, TrialView, is_failure, outcome
from search.progress import end_reason
from trainable.config import RUN_FIELDS, TrialConfig

SCALARS = ("val_acc", "val_loss", "train_loss", "lr", "stage", "best_val_acc", "val_coarse_acc",
           "val_coarse_head_acc")
HPARAMS = tuple(f.name for f in fields(TrialConfig) if f.name not in RUN_FIELDS)


def hparams_session(config: dict, status: str, group: str) -> list[Summary]:
    """The trial's HParams session: its hyper-parameters and outcome `status`, ended as a failure for a failed one."""
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
               for k in HPARAMS if (v := config.get(k)) is not None}
    # tensorboard's summary_v2 (and torch's hparams()) write no failed session end
    failed = api_pb2.Status.STATUS_FAILURE if is_failure(status) else api_pb2.Status.STATUS_SUCCESS
    end = HParamsPluginData(session_end_info=SessionEndInfo(status=failed, end_time_secs=time.time()))
    return [hparams_pb(hparams | {"status": status}, trial_id=group),
            Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(end))])]


class EpochTensorBoard(TBXLoggerCallback):
    def __init__(self, exp=None):
        # no super().__init__(): it imports tensorboardX, which this class doesn't use
        self.exp = exp
        self.writers: dict = {}  # trial -> SummaryWriter
        self.last: dict = {}  # trial -> its latest epoch's result

    def log_trial_start(self, trial) -> None:
        if trial in self.writers:
            self.writers[trial].close()
        trial.init_local_path()
        self.writers[trial] = SummaryWriter(log_dir=str(trial.local_path), flush_secs=30)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial not in self.writers:
            self.log_trial_start(trial)
        step = result.get("epoch")
        if not isinstance(step, (int, float)):
            return  # Tune's own bookkeeping rows
        for key in SCALARS:
            v = result.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writers[trial].add_scalar(key, float(v), global_step=int(step))
        if int(step) >= int(self.last.get(trial, {}).get("epoch", 0)):
            self.last[trial] = result
        self.writers[trial].flush()

    def log_trial_end(self, trial, failed: bool = False, ended_by_search: str = "") -> None:
        writer = self.writers.pop(trial, None)
        if writer is None:
            return
        status = outcome(TrialView(trial.config or {}, self.last.pop(trial, {}), errored=failed,
                                   live="TERMINATED", ended_by_search=ended_by_search))
        for summary in hparams_session(trial.config or {}, status, group=str(trial.trial_id)):
            writer.file_writer.add_summary(summary)
        writer.close()

    def on_experiment_end(self, trials: list, **info) -> None:
        """A trial the time budget cut ends its session; an interrupted one gets none: --resume writes its end."""
        reason = end_reason(self.exp)
        for trial in list(self.writers):
            if reason == OUT_OF_BUDGET:
                self.log_trial_end(trial, ended_by_search=reason)
                upload_events(trial)
            else:
                self.writers.pop(trial).close()


def upload_events(trial) -> None:
    """Copy the trial's event files to its storage (Tune's last sync ran before on_experiment_end) through
    Tune's storage filesystem: `trial.path` has no scheme."""
    src, fs, dest = Path(trial.local_path), trial.storage.storage_filesystem, str(trial.path)
    if isinstance(fs, pyarrow.fs.LocalFileSystem) and src.resolve() == Path(dest).resolve():
        return
    fs.create_dir(dest, recursive=True)
    for f in src.glob("events.out.tfevents.*"):
        pyarrow.fs.copy_files(str(f), f"{dest}/{f.name}", destination_filesystem=fs)
