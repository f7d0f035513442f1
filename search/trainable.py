"""The Ray Tune face of a trial: checkpoints in and out through Tune, everything else is run_trial."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from ray import tune

from trainable.data import Split
from trainable.memory import limit_memory, trial_budget
from trainable.trial import pick_device, run_trial


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

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_trial(config, train, val, report)
        return
    with checkpoint.as_directory() as restore:  # a restarted trial continues where it stopped
        run_trial(config, train, val, report, restore=Path(restore))
