"""TensorBoard for a search: per trial, the epoch metrics against the global epoch, and the HParams view.

`EpochTensorBoard` replaces Tune's TBXLoggerCallback (a subclass, so Tune adds no second one), which
logs every key against `training_iteration` and puts the last result, not the best, in HParams. Into
each trial's folder it writes the SCALARS with step = the result's `epoch`, and when the trial ends one
HParams session (TensorBoard keeps a run's first): the trial's hyper-parameters plus its outcome
`status`, ending as a failure for diverged, oom and errored. A trial interrupted by Ctrl-C gets none:
`--resume` writes its real end. torch's `hparams()` has no group name nor a failed session end.
"""
from __future__ import annotations

import math
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import pyarrow.fs
from google.protobuf.struct_pb2 import Struct
from ray.tune.logger import TBXLoggerCallback
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo
from torch.utils.tensorboard import SummaryWriter

from analysis.outcome import OUT_OF_BUDGET, TrialView, is_failure, outcome
from search.progress import end_reason
from trainable.config import RUN_FIELDS, TrialConfig

SCALARS = ("val_acc", "val_loss", "train_loss", "lr", "stage", "best_val_acc", "val_coarse_acc",
           "val_coarse_head_acc")
STEP = "epoch"
HPARAMS = tuple(f.name for f in fields(TrialConfig) if f.name not in RUN_FIELDS)


def hparams_session(config: dict[str, Any], status: str, group: str) -> list[Summary]:
    """The trial's HParams session: its hyper-parameters and outcome `status`, ended as a failure for a failed one."""
    hparams = Struct()  # protobuf Values, bool, number or string by the Python type
    hparams.update({k: v if isinstance(v, (bool, int, float, str)) else str(v)
                    for k in HPARAMS if (v := config.get(k)) is not None} | {"status": status})
    start = SessionStartInfo(hparams=hparams.fields, group_name=group, start_time_secs=time.time())
    end = SessionEndInfo(status=api_pb2.Status.STATUS_FAILURE if is_failure(status) else api_pb2.Status.STATUS_SUCCESS,
                         end_time_secs=time.time())
    return [_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start),
            _summary(metadata.SESSION_END_INFO_TAG, session_end_info=end)]


def _summary(tag: str, **info) -> Summary:
    content = HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **info).SerializeToString()
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content)
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


class EpochTensorBoard(TBXLoggerCallback):
    """Per-trial TensorBoard scalars against the global epoch, and HParams sessions."""

    def __init__(self, scalars: tuple[str, ...] = SCALARS, flush_secs: int = 30, exp=None):
        # no super().__init__(): it imports tensorboardX, which this class doesn't use
        self.scalars, self.flush_secs, self.exp = tuple(scalars), flush_secs, exp
        self._trial_writer: dict[Any, SummaryWriter] = {}
        self._last_result: dict[Any, dict] = {}  # the latest epoch's result per trial

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_writer:
            self._trial_writer[trial].close()
        trial.init_local_path()
        self._trial_writer[trial] = SummaryWriter(log_dir=str(trial.local_path), flush_secs=self.flush_secs)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        step = result.get(STEP)
        if not isinstance(step, (int, float)):
            return  # not an epoch result (e.g. Tune's own bookkeeping rows)
        writer = self._trial_writer[trial]
        for key in self.scalars:
            v = result.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                writer.add_scalar(key, float(v), global_step=int(step))
        if int(step) >= int(self._last_result.get(trial, {}).get(STEP, 0)):
            self._last_result[trial] = result
        writer.flush()

    def log_trial_end(self, trial, failed: bool = False, ended_by_search: str = "") -> None:
        writer = self._trial_writer.pop(trial, None)
        if writer is None:
            return
        status = outcome(TrialView(trial.config or {}, self._last_result.pop(trial, {}), errored=failed,
                                   live="TERMINATED", ended_by_search=ended_by_search))
        for summary in hparams_session(trial.config or {}, status, group=str(trial.trial_id)):
            writer.file_writer.add_summary(summary)
        writer.close()

    def on_experiment_end(self, trials: list, **info) -> None:
        """Trials the search's end cut short: out of time budget ends their session; interrupted
        ones get none, so that --resume writes their real end."""
        reason = end_reason(self.exp)
        for trial in list(self._trial_writer):
            if reason == OUT_OF_BUDGET:
                self.log_trial_end(trial, ended_by_search=reason)
                upload_events(trial)
            else:
                self._trial_writer.pop(trial).close()


def upload_events(trial) -> None:
    """Copy the trial's event files from the driver's staging folder to its storage (Tune's last sync
    ran before on_experiment_end), through Tune's storage filesystem: `trial.path` has no scheme."""
    src, fs, dest = Path(trial.local_path), trial.storage.storage_filesystem, str(trial.path)
    if isinstance(fs, pyarrow.fs.LocalFileSystem) and src.resolve() == Path(dest).resolve():
        return
    fs.create_dir(dest, recursive=True)  # there already when Tune synced the trial; cheap if so
    for f in src.glob("events.out.tfevents.*"):
        pyarrow.fs.copy_files(str(f), f"{dest}/{f.name}", destination_filesystem=fs)
