"""The Ray Tune face of a trial: checkpoints in and out through Tune, everything else is run_trial."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ray import tune

from trainable.data import Split
from trainable.memory import limit_memory, trial_budget
from trainable.trial import is_out_of_memory, pick_device, run_trial

OOM_RETRIED = ".oom_retried"  # in the trial's folder: its first out-of-memory error was retried


def shares_a_gpu(resources: Mapping[str, float]) -> bool:
    """Whether the trial holds part of a GPU (`--gpus-per-trial` 0.5, 1.5, ...): other trials
    allocate on the same device, so its out-of-memory error may be theirs."""
    gpus = float(resources.get("GPU", 0) or 0)
    return gpus > 0 and not gpus.is_integer()


def retry_first_oom(resources: Mapping[str, float], restarted: bool) -> bool:
    """Re-raise an out-of-memory error so Tune restarts the trial from its checkpoint (up to
    --max-failures), instead of ending it with status oom and a 0 for TPE: only on a shared GPU,
    and only once; after a restart (or on a whole GPU, or on the CPU) the config is to blame."""
    return shares_a_gpu(resources) and not restarted


def tune_trial(config: dict[str, Any], train: Split, val: Split) -> None:
    """Tune's function trainable; `train`/`val` arrive through the object store (one copy a node)."""
    # Ray sets OMP_NUM_THREADS from the trial's CPUs; torch must use the same count or trials
    # sharing a node oversubscribe its cores
    cpus = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.set_num_threads(cpus)
    if pick_device().type == "cpu":  # past its share an allocation fails: status oom, search goes on
        limit_memory(trial_budget(cpus))

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)

    ctx = tune.get_context()
    checkpoint = tune.get_checkpoint()
    # a restart from a checkpoint, or one before the first checkpoint that the marker remembers
    marker = Path(ctx.get_trial_dir()) / OOM_RETRIED
    retry = retry_first_oom(ctx.get_trial_resources().required_resources,
                            restarted=checkpoint is not None or marker.exists())
    try:
        if checkpoint is None:
            run_trial(config, train, val, report, raise_oom=retry)
            return
        with checkpoint.as_directory() as restore:  # a restarted trial continues where it stopped
            run_trial(config, train, val, report, restore=Path(restore), raise_oom=retry)
    except (MemoryError, RuntimeError) as e:
        if retry and is_out_of_memory(e):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        raise
