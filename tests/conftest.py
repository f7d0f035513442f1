"""Shared fixtures: the dataset the tests train on, and the offline weights when present."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from tests.fake_cifar import stand_in_dir, write_fake_cifar

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights"


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny batches run fastest so, and on the shared 2-core machine
    two OpenMP threads contending with other test runs made such tests several times slower."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real-image stand-in when present, else a small generated set in the same format."""
    real = stand_in_dir()
    if real is not None:
        return real
    return write_fake_cifar(tmp_path_factory.mktemp("fake_cifar"), train_per_class=60, test_per_class=10)


@pytest.fixture(scope="session")
def weights_args() -> list[str]:
    """CLI flags for pretrained weights: the offline folder when present, else random init."""
    if (WEIGHTS / "tf_efficientnet_lite0.pth").is_file():
        return ["--weights-dir", str(WEIGHTS), "--backbones", "tf_efficientnet_lite0"]
    return ["--no-pretrained"]


def run_cli(script: str, *args: str, timeout: float = 900, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's CLIs the way a user would, from the repo root."""
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


E2E_SAMPLES = 6


# the files that take longest, longest first (seconds in one process, 2026-12-07): under `make test`'s
# `-n 2 --dist loadfile --no-loadscope-reorder` each worker takes the next whole file (its module fixtures,
# a search or a Ray, built once) when it is free, so these start first and the short ones fill in at the end
LONGEST = ("test_faults", "test_e2e", "test_report", "test_resume", "test_trial", "test_cloud_storage",
           "test_search_budget", "test_incumbent", "test_two_searches", "test_oom", "test_precision",
           "test_retrain_cut", "test_features", "test_dashboard", "test_precheck", "test_pretrained")


def pytest_collection_modifyitems(config, items):
    """The longest test files first, each file's own order kept."""
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(LONGEST)))


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str,
                 make: Callable[[Path], subprocess.CompletedProcess]) -> tuple[Path, subprocess.CompletedProcess]:
    """`make(folder)` run once per test run, not once per xdist worker: the first worker to ask runs it under
    a file lock in the folder the workers share and records the process; the others read the record
    (pytest-xdist's documented recipe for a session fixture that must run once). (folder, process)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        return folder, make(folder)
    root = tmp_path_factory.getbasetemp().parent  # the run's folder, above each worker's own
    record, folder = root / f"{name}.json", root / name
    with FileLock(str(record) + ".lock"):
        if not record.is_file():
            folder.mkdir(exist_ok=True)
            proc = make(folder)
            record.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode,
                                          "stdout": proc.stdout, "stderr": proc.stderr}))
    return folder, subprocess.CompletedProcess(**json.loads(record.read_text()))


@pytest.fixture(scope="session")
def e2e_search(tmp_path_factory, data_dir, weights_args) -> tuple[Path, subprocess.CompletedProcess]:
    """One search through the CLI (tiny space, 2 logical GPUs), shared by the tests that only read
    what it wrote (test_e2e, test_report; one search for both workers): (experiment folder, the process)."""
    def search(storage: Path) -> subprocess.CompletedProcess:
        return run_cli("run_search.py", "--space", "tiny", "--gpus", "2", "--cpus-per-trial", "1",
                       "--num-samples", E2E_SAMPLES, "--subset", 10, "--data-dir", data_dir,
                       "--storage-path", storage, "--name", "e2e", "--seed", 0, *weights_args, check=True)
    storage, proc = once_per_run(tmp_path_factory, "e2e_runs", search)
    return storage / "e2e", proc


@pytest.fixture(scope="session")
def e2e_analyzed(tmp_path_factory, e2e_search) -> tuple[Path, subprocess.CompletedProcess]:
    """The shared search's best config retrained, tested and reported by analyze.py (once for both workers).
    A test that writes more into the experiment works on a copy of it."""
    exp = e2e_search[0]
    _, proc = once_per_run(tmp_path_factory, "e2e_analyzed", lambda _: run_cli("analyze.py", exp, check=True))
    return exp, proc


@pytest.fixture(autouse=True)
def _no_moved_study_between_tests():
    """A CLI called in this process with --resume points every later unpickled study at its folder
    (one search per process in real use); each test starts without that."""
    yield
    import analysis.study  # here, not at the top: conftest stays import-light for the pure tests
    analysis.study._moved_to.clear()


def wait_until_still(root: Path, still: float = 5.0, timeout: float = 120.0) -> None:
    """Return once nothing under `root` has changed for `still` seconds. A trial worker of a SIGKILLed search can
    outlive its driver for a while and finish writing a result or checkpoint (seen: state.pt 0 -> 4 MB a minute
    after the kill), which a test would take for a write of what it runs next."""
    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*") if p.exists()}
    last, since, deadline = snapshot(), time.time(), time.time() + timeout
    while time.time() - since < still:
        assert time.time() < deadline, f"{root} still changing {timeout:.0f} s after the kill"
        time.sleep(0.5)
        now = snapshot()
        if now != last:
            last, since = now, time.time()
