"""A CPU trial's memory budget: an allocation past it fails in the trial, as an out-of-memory error
the trial reports (status oom), instead of Ray's memory monitor killing the worker."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO
from trainable.memory import trial_budget

GIB = 1 << 30

PROBE = """
import torch
from trainable.memory import limit_memory
from trainable.memory import is_out_of_memory
torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # within budget: fine
limit_memory(512 << 20)
small = torch.empty(128 << 20, dtype=torch.uint8).fill_(1)  # still within
try:
    torch.empty(2 << 30, dtype=torch.uint8)
except (RuntimeError, MemoryError) as e:
    print("oom" if is_out_of_memory(e) else f"other: {e}")
else:
    print("allocated")
"""


def test_an_allocation_past_the_budget_is_an_out_of_memory_error():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "oom"


def test_without_a_budget_the_same_allocation_succeeds():
    probe = PROBE.replace("limit_memory(512 << 20)", "pass")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "allocated", out.stderr[-2000:]


def test_budget_is_the_trials_cpu_share_of_most_of_the_ram():
    assert trial_budget(1, node_cpus=2, node_ram=24 * GIB) == int(24 * GIB * 0.8 / 2)
    assert trial_budget(4, node_cpus=2, node_ram=24 * GIB) == int(24 * GIB * 0.8)  # never above the node
