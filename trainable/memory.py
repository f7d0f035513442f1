"""A CPU trial's memory budget, enforced by the kernel (RLIMIT_AS) in the trial's own process.

Past it an allocation fails inside the trial, which ends with status "oom" while the search goes on;
else Ray's memory monitor SIGKILLs the worker, and Ray Tune does not survive that (the whole search
stops). GPU trials are left alone: CUDA's out of memory is an exception already.
"""
from __future__ import annotations

import os
import resource

import torch

# Ray's memory monitor SIGKILLs a worker once the node uses more than this share of its RAM (Ray's default;
# RAY_memory_usage_threshold changes it). A duel's two 224 px fine-tunes at the old budget (0.8 of the RAM split by
# CPU, whatever the driver held) reached 10.5 + 7.0 GB beside a 3.3 GB driver: killed, and the search with them.
RAY_THRESHOLD = 0.95
SHARE = 0.8  # of what the threshold leaves: each trial's own start (~1 GB of torch) and the driver's growth


def vm_size() -> int:
    """This process's virtual size in bytes (what RLIMIT_AS counts)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    return kb * 1024


def node_in_use() -> int:
    """Bytes of the node's RAM in use now (MemTotal - MemAvailable): the driver, Ray, the OS, other searches;
    0 where /proc/meminfo is not there to say (macOS): the budget then counts the whole RAM, as it did before."""
    try:
        with open("/proc/meminfo") as f:
            kb = {line.split(":")[0]: int(line.split()[1]) for line in f}
        return (kb["MemTotal"] - kb["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return 0


def trial_budget(trial_cpus: int, node_cpus: int | None = None, node_ram: int | None = None, in_use: int = 0) -> int:
    """Bytes a trial may add: its CPUs' share (trials are packed by CPU) of SHARE of the RAM Ray's memory monitor lets
    the node use, less `in_use`, what the node held before the trials started (search.run measures it)."""
    node_cpus = node_cpus or os.cpu_count() or 1
    node_ram = node_ram or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    threshold = float(os.environ.get("RAY_memory_usage_threshold", RAY_THRESHOLD))
    return int(max(0, node_ram * threshold - in_use) * SHARE * min(1.0, trial_cpus / node_cpus))


_START: list[int] = []  # this process's size when it was first limited


def limit_memory(budget: int) -> int:
    """Let this process grow by at most `budget` bytes from its size at the first call; returns the limit set. A Tune
    worker runs trial after trial (reuse_actors): measured from each trial's start, the cap rose by whatever the last
    trial left mapped (a duel's worker reached 12.5 GB under a 7 GB budget and Ray's monitor killed the search)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    _START[:] = _START or [vm_size()]
    limit = _START[0] + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


# how an allocation failure reads, on CUDA (its allocator, cuBLAS, cuDNN) and on the CPU (torch's
# allocator, C++ new, the kernel's ENOMEM under the trial's RLIMIT_AS)
OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc",
             "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUFFT_ALLOC_FAILED")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation failure, on CUDA or on the CPU."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(t.lower() in text for t in OOM_TEXTS)
