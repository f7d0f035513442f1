"""Whole searches through the real CLI (run_search.py, in a subprocess), and a sampler of the
memory of the search's whole process tree (driver, Ray's own processes, every trial worker).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY = Path(__file__).resolve().parent / "_search_entry.py"
MiB = 2 ** 20
# Without an address, ray.init() joins the cluster named in /tmp/ray/ray_current_cluster (left by
# any `ray start` on this machine) and then refuses run_search's num_cpus: each benchmark search
# gets a Ray of its own, as on a machine nobody else uses.
ISOLATE = {"RAY_ADDRESS": "local"}


def import_psutil():
    """psutil: the project's venv gets it from ray[default], which ships it inside Ray's
    thirdparty_files folder (added to sys.path by `import ray`) rather than as a top-level package."""
    try:
        import psutil
    except ImportError:
        import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path
        import psutil
    return psutil


def is_trial_worker(name: str) -> bool:
    return "ImplicitFunc" in name  # Ray's process title for a Tune function trainable's actor


@dataclass
class MemoryPeak:
    """Peaks of the sums over the process tree, each taken at its own sample."""
    pss: float = 0.0  # bytes; proportional set size: a shared page counts 1/n in each of n mappers
    rss: float = 0.0  # bytes; a shared page counts in full in every process that maps it
    uss: float = 0.0  # bytes; pages private to one process
    at_pss_peak: dict = field(default_factory=dict)  # breakdown (MiB) at the PSS peak
    workers_at_pss_peak: int = 0
    trial_workers_seen: int = 0
    max_concurrent_workers: int = 0
    worker_plasma_rss: float = 0.0  # largest object-store mapping (resident) of one trial worker
    worker_plasma_pss: float = 0.0
    samples: int = 0


class TreeSampler(threading.Thread):
    """Sums memory_full_info() (RSS, PSS, USS) over a process and all its descendants every
    `interval` s and keeps the peaks. Trial workers are also read mapping by mapping to see how
    much of Ray's object store (the /dev/shm/plasma* file) they have resident."""

    def __init__(self, root_pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.psutil = import_psutil()
        self.root = self.psutil.Process(root_pid)
        self.interval = interval
        self.peak = MemoryPeak()
        self.first_seen: dict[int, float] = {}  # trial worker pid -> when first seen
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.sample()
            except self.psutil.NoSuchProcess:
                return
            self._halt.wait(self.interval)

    def sample(self) -> None:
        ps = self.psutil
        procs = [self.root] + self.root.children(recursive=True)
        tot = {"pss": 0, "rss": 0, "uss": 0}
        parts = {"driver": 0, "trial workers": 0, "ray system": 0}
        workers = 0
        for p in procs:
            try:
                m = p.memory_full_info()
                name = p.name()
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                continue
            for k in tot:
                tot[k] += getattr(m, k)
            if p.pid == self.root.pid:
                parts["driver"] += m.pss
            elif is_trial_worker(name):
                workers += 1
                parts["trial workers"] += m.pss
                self.first_seen.setdefault(p.pid, time.monotonic())
                self._plasma(p)
            else:
                parts["ray system"] += m.pss
        pk = self.peak
        pk.samples += 1
        pk.trial_workers_seen = len(self.first_seen)
        pk.max_concurrent_workers = max(pk.max_concurrent_workers, workers)
        pk.rss, pk.uss = max(pk.rss, tot["rss"]), max(pk.uss, tot["uss"])
        if tot["pss"] > pk.pss:
            pk.pss = tot["pss"]
            pk.at_pss_peak = {k: v / MiB for k, v in parts.items()}
            pk.workers_at_pss_peak = workers

    def _plasma(self, p) -> None:
        try:
            maps = p.memory_maps(grouped=True)
        except Exception:  # noqa: BLE001 - the worker may be exiting
            return
        rss = sum(m.rss for m in maps if "plasma" in m.path)
        pss = sum(m.pss for m in maps if "plasma" in m.path)
        self.peak.worker_plasma_rss = max(self.peak.worker_plasma_rss, rss)
        self.peak.worker_plasma_pss = max(self.peak.worker_plasma_pss, pss)


@dataclass
class SearchRun:
    exp: Path
    wall: float
    returncode: int
    log: Path
    interrupted: bool = False
    memory: MemoryPeak | None = None


def count_results(exp: Path) -> int:
    n = 0
    for f in exp.glob("*/result.json"):
        try:
            n += sum(1 for line in f.read_text().splitlines() if line.strip())
        except OSError:
            pass
    return n


def run_search(args: list[str], *, exp: Path, log: Path, same_configs: bool = False,
               memory: bool = False, timebox: float | None = None, expect_workers: int = 0,
               timeout: float = 1800, progress=None, env: dict | None = None) -> SearchRun:
    """Run `run_search.py ARGS` (through _search_entry.py) to completion, or, with `timebox`,
    until `expect_workers` trial workers have each been alive `timebox` s, then stop it like a
    user's Ctrl-C (SIGINT: Tune saves state, Ray shuts down).

    `progress` (a tqdm bar or None) is advanced by the number of result rows written.
    """
    cmd = [sys.executable, str(ENTRY)] + (["--same-configs"] if same_configs else []) + list(map(str, args))
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **ISOLATE, **(env or {})})
        sampler = TreeSampler(proc.pid) if memory else None
        if sampler:
            sampler.start()
        interrupted = False
        shown = 0
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if progress is not None and exp.exists():
                    n = count_results(exp)
                    if n > shown:
                        progress.update(n - shown)
                        shown = n
                now = time.monotonic()
                if (timebox is not None and sampler is not None and not interrupted
                        and len(sampler.first_seen) >= expect_workers
                        and all(now - t >= timebox for t in sampler.first_seen.values())):
                    proc.send_signal(signal.SIGINT)
                    interrupted = True
                if now - t0 > timeout and not interrupted:
                    proc.send_signal(signal.SIGINT)
                    interrupted = True
            proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            if sampler:
                sampler.stop()
    return SearchRun(exp=exp, wall=time.monotonic() - t0, returncode=proc.returncode, log=log,
                     interrupted=interrupted, memory=sampler.peak if sampler else None)


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C the search we started; if it will not go, end its process group (ours alone:
    it was started in a new session)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def search_args(*, data_dir: str, weights_dir: str, storage: Path, name: str, samples: int,
                concurrent: int, cpus_per_trial: int, scheduler: str, seed: int,
                subset: int | None, max_epochs: int | None, sets: dict, gpus: int) -> list[str]:
    args = ["--gpus", gpus, "--space", "tiny", "--num-samples", samples, "--data-dir", data_dir,
            "--backbones", "tf_efficientnet_lite0", "--storage-path", storage, "--name", name,
            "--max-concurrent", concurrent, "--cpus-per-trial", cpus_per_trial,
            "--scheduler", scheduler, "--seed", seed]
    args += ["--weights-dir", weights_dir] if weights_dir else ["--no-pretrained"]
    if subset is not None:
        args += ["--subset", subset]
    if max_epochs is not None:
        args += ["--max-epochs", max_epochs]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return [str(a) for a in args]


def configs_of(exp: Path) -> list[str]:
    """Each trial's params.json, canonical and sorted (Tune's trial ids are random, so two
    searches are compared as multisets of configs)."""
    from search.export import load_trials
    return sorted(json.dumps(t.config, sort_keys=True) for t in load_trials(exp))
