"""The Ray Tune face of a trial: checkpoints in and out through Tune, everything else is run_trial."""
from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from trainable.data import Split
from trainable.memory import is_out_of_memory, limit_memory, trial_budget
from trainable.trial import run_trial

OOM_RETRIED = ".oom_retried"  # in the trial's folder: its first out-of-memory error was retried
CUDA_CONTEXT_BYTES = 512 << 20  # a process's CUDA context and kernels: outside the caching allocator


def trial_device(gpus: float, gpu_ids: Sequence[int | str], cuda_visible: str | None) -> torch.device:
    """The device from the trial's GPU request and ids, never from what CUDA sees: Ray 2.60 leaves GPUs visible
    to a trial that asked for none (ray#54868). The first GPU, by its position in CUDA_VISIBLE_DEVICES, as Ray's
    get_devices does (private API: ray.air._internal)."""
    if gpus <= 0 or not gpu_ids or not torch.cuda.is_available():
        return torch.device("cpu")
    first = str(gpu_ids[0])
    if cuda_visible is None:
        return torch.device("cuda", int(first))
    visible = [v.strip() for v in cuda_visible.split(",") if v.strip()]
    if first not in visible:
        raise RuntimeError(f"Ray assigned GPU {first} but CUDA_VISIBLE_DEVICES is {cuda_visible!r}: "
                           f"was CUDA_VISIBLE_DEVICES changed inside the trial?")
    return torch.device("cuda", visible.index(first))


def retry_first_oom(gpus: float, restarted: bool) -> bool:
    """Let Tune restart a trial after an out-of-memory error only on part of a GPU, where it may be another
    trial's, and once: after a restart the config is to blame."""
    return not gpus.is_integer() and not restarted


def memory_fraction(gpus: float, total_bytes: int) -> float | None:
    """The share of its GPU's memory a trial holding part of it may allocate (None for a whole GPU),
    leaving room for each process's CUDA context, which the cap does not count."""
    if not 0 < gpus < 1:
        return None
    return max(gpus / 2, gpus - CUDA_CONTEXT_BYTES / total_bytes)


def tune_trial(config: dict[str, Any], train: Split, val: Split, in_use: int = 0, scratch: str = "") -> None:
    """Tune's function trainable; `train`/`val` arrive through the object store (one copy a node); `in_use`:
    bytes of the driver's node in use before the trials started (memory.trial_budget); `scratch`: the
    experiment's folder on the driver, where each checkpoint is written until Tune has copied it (on a node
    without it, the system's temp folder): a killed search leaves its last ones there, not in /tmp."""
    # Ray sets OMP_NUM_THREADS from the trial's CPUs: torch uses as many, or trials sharing a node oversubscribe it
    cpus = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.set_num_threads(cpus)
    ctx = tune.get_context()
    gpus = float(ctx.get_trial_resources().required_resources.get("GPU", 0) or 0)
    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []  # [] outside a Ray worker (tests)
    device = trial_device(gpus, gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if device.type == "cpu":  # past its share an allocation fails: status oom, search goes on
        limit_memory(trial_budget(cpus, in_use=in_use))
    elif (share := memory_fraction(gpus, torch.cuda.get_device_properties(device).total_memory)) is not None:
        torch.cuda.set_per_process_memory_fraction(share, device)  # past its share it fails here, not in another trial

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None)

    checkpoint = tune.get_checkpoint()
    marker = Path(ctx.get_trial_dir()) / OOM_RETRIED
    # a restart from a checkpoint, or one before the first checkpoint that the marker remembers
    retry = retry_first_oom(gpus, restarted=checkpoint is not None or marker.exists())
    try:  # a restarted trial continues where its checkpoint stopped
        with (checkpoint.as_directory() if checkpoint is not None else nullcontext()) as restore:
            run_trial(config, train, val, report, restore=Path(restore) if restore else None, raise_oom=retry,
                      device=device, scratch=Path(scratch) if scratch and Path(scratch).is_dir() else None)
    except (MemoryError, RuntimeError) as e:
        if retry and is_out_of_memory(e):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        raise
