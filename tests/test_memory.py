"""A CPU trial's memory budget: an allocation past it fails in the trial, as an out-of-memory error
the trial reports (status oom), instead of Ray's memory monitor killing the worker."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO
from trainable.memory import node_in_use, trial_budget

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


def test_budget_is_the_trials_cpu_share_of_what_rays_memory_monitor_leaves(monkeypatch):
    monkeypatch.delenv("RAY_memory_usage_threshold", raising=False)
    assert trial_budget(1, node_cpus=2, node_ram=24 * GIB) == int(24 * GIB * 0.95 * 0.8 / 2)
    assert trial_budget(4, node_cpus=2, node_ram=24 * GIB) == int(24 * GIB * 0.95 * 0.8)  # never above the node
    # the duel's crash: a 3.3 GB driver and Ray's 1 GB beside two 1-CPU trials on a 23.5 GB node (they reached
    # 10.5 and 7.0 GB). Each trial may now add 7.2 GB to the ~1 GB it starts with: both at their limits stay under
    # the 95 % at which Ray kills a worker, with room for the driver to grow
    in_use = int(4.3 * GIB)
    budget = trial_budget(1, node_cpus=2, node_ram=int(23.5 * GIB), in_use=in_use)
    assert 2 * (budget + GIB) + in_use < 0.95 * 23.5 * GIB - GIB and budget > 7 * GIB
    assert trial_budget(1, node_cpus=2, node_ram=8 * GIB, in_use=9 * GIB) == 0  # nothing left: nothing to add
    monkeypatch.setenv("RAY_memory_usage_threshold", "0.8")  # Ray's own knob moves the line
    assert trial_budget(2, node_cpus=2, node_ram=10 * GIB) == int(10 * GIB * 0.8 * 0.8)


def test_node_in_use_reads_the_kernels_count():
    assert 0 < node_in_use() < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_the_node_in_use_is_0_where_proc_meminfo_is_not_there(monkeypatch):
    """macOS has no /proc/meminfo: the search must start there, with the budget counting the whole RAM."""
    import builtins

    from trainable import memory
    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)
    assert memory.node_in_use() > 0  # this Linux machine
    monkeypatch.setattr(builtins, "open", no_proc)
    assert memory.node_in_use() == 0


def test_a_reused_worker_keeps_the_budget_of_its_first_trial():
    """Tune runs trial after trial in one worker (reuse_actors): the next trial's cap is not raised by what the last
    one left mapped (was: its size at the call + the budget, so the cap grew trial by trial)."""
    probe = """
import torch
from trainable.memory import is_out_of_memory, limit_memory
limit_memory(512 << 20)
held = torch.empty(384 << 20, dtype=torch.uint8).fill_(1)  # what the first trial leaves mapped
limit_memory(512 << 20)  # the next trial in the same worker
try:
    torch.empty(256 << 20, dtype=torch.uint8).fill_(1)  # 384 + 256 MB: past the 512 MB budget
except (RuntimeError, MemoryError) as e:
    print("oom" if is_out_of_memory(e) else f"other: {e}")
else:
    print("allocated")
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "oom", out.stdout + out.stderr[-2000:]


RAY_MEMORY_KILL = ("Caught unexpected exception: 1 worker(s) were killed due to the node running low on memory. Memory on "
                   "the node (IP: 192.0.2.2, ID: 87f9) was 22.59GB used / 23.54GB limit (0.959657)\nOOM kill reason: ...")


def test_a_worker_rays_memory_monitor_kills_stops_the_search_with_one_line(monkeypatch, capsys, tmp_path):
    """Tune 2.60 re-raises Ray's OutOfMemoryError when the monitor kills a worker it is starting a trial in (a duel's
    search printed a traceback and exit 1): one line saying so and how to continue, results kept."""
    import run_search
    import search.run
    from analysis.experiment import SETTINGS_FILE
    from tests.fake_cifar import write_fake_cifar

    class Tuner:
        def fit(self):
            raise RuntimeError(RAY_MEMORY_KILL)
    monkeypatch.setattr(search.run, "start_ray", lambda *a, **k: None)
    monkeypatch.setattr(search.run, "build_tuner", lambda *a, **k: Tuner())
    data = write_fake_cifar(tmp_path / "data", train_per_class=3, test_per_class=1)
    code = run_search.main(["--space", "tiny", "--no-pretrained", "--gpus", "0", "--num-samples", "2", "--warm-start",
                            "none", "--data-dir", str(data), "--storage-path", str(tmp_path / "runs"), "--name", "e"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "memory monitor killed" in err[0] and "22.59GB used / 23.54GB" in err[0] and "--resume --name e" in err[0]
    assert (tmp_path / "runs" / "e" / SETTINGS_FILE).is_file()  # what was written is kept for --resume
