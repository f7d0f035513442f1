"""Which device a search trial trains on: decided from the GPUs Ray assigned it, under both settings
of RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO (logical GPUs, CUDA faked where a GPU would be), and the
memory share of a trial on a shared GPU."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from search import tune_trial as search_trainable
from search.tune_trial import memory_fraction, trial_device

CPU = torch.device("cpu")
GiB = 1 << 30


def _no_cuda_query():
    raise AssertionError("a trial without a GPU must not ask CUDA anything")


@pytest.mark.parametrize("gpus, ids, visible, expected", [
    (0, [], "0,1", CPU),  # Ray left every GPU visible to a CPU trial: still the CPU
    (0, [], "", CPU),  # the old behaviour: blanked
    (0, [], None, CPU),
    (1, ["1"], "1", torch.device("cuda", 0)),  # Ray narrowed CUDA_VISIBLE_DEVICES to the assigned GPU
    (0.5, ["0"], "0", torch.device("cuda", 0)),
    (1, ["2"], "0,1,2,3", torch.device("cuda", 2)),  # a variable Ray did not narrow: its position
    (1, ["5"], "4,5", torch.device("cuda", 1)),
    (1, [3], None, torch.device("cuda", 3)),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: the id itself
    (2, ["0", "1"], "0,1", torch.device("cuda", 0)),  # one trial trains on one GPU: the first
])
def test_the_device_follows_the_assigned_gpus(monkeypatch, gpus, ids, visible, expected):
    monkeypatch.setattr(torch.cuda, "is_available", (lambda: True) if gpus > 0 else _no_cuda_query)
    assert trial_device(gpus, ids, visible) == expected


def test_logical_gpus_without_cuda_mean_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trial_device(1, ["0"], "0") == CPU


def test_an_assigned_gpu_missing_from_cuda_visible_devices_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="Ray assigned GPU 3 but CUDA_VISIBLE_DEVICES is '0,1'"):
        trial_device(1, ["3"], "0,1")


@pytest.mark.parametrize("gpus, total, expected", [
    (1, 16 * GiB, None), (0, 16 * GiB, None), (2, 16 * GiB, None),
    (0.5, 16 * GiB, 0.5 - 1 / 32),  # half the card, minus this process's CUDA context
    (0.25, 80 * GiB, 0.25 - 1 / 160),
    (0.5, 1 * GiB, 0.25),  # a tiny card: never below half the share
])
def test_a_shared_gpu_caps_each_trial_at_its_share(gpus, total, expected):
    assert memory_fraction(gpus, total) == (pytest.approx(expected) if expected else None)


# --- tune_trial, with Tune and Ray faked: what it hands run_trial -----------------------------------------

@pytest.fixture
def fake_trial(monkeypatch, tmp_path):
    """Run tune_trial for a trial holding `gpus` GPUs with the ids `ids`, on a machine whose CUDA
    sees every GPU (torch.cuda faked); returns what run_trial got and what was capped."""
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    def run(gpus: float, ids: list[str], visible: str) -> dict:
        seen: dict = {"budget": None, "fraction": None}
        resources = PlacementGroupFactory([{"CPU": 1, "GPU": gpus}])
        ctx = SimpleNamespace(get_trial_dir=lambda: str(tmp_path), get_trial_resources=lambda: resources)
        monkeypatch.setattr(search_trainable, "tune", SimpleNamespace(
            get_context=lambda: ctx, get_checkpoint=lambda: None, report=None, Checkpoint=None))
        monkeypatch.setattr(search_trainable, "ray", SimpleNamespace(is_initialized=lambda: True,
                                                                     get_gpu_ids=lambda: ids))
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=16 * GiB))
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                            lambda f, d=None: seen.update(fraction=(f, d)))
        monkeypatch.setattr(search_trainable, "limit_memory", lambda budget: seen.update(budget=budget))
        monkeypatch.setattr(search_trainable, "run_trial", lambda *a, **k: seen.update(device=k["device"]))
        before = torch.get_num_threads()
        try:
            search_trainable.tune_trial({}, None, None)
        finally:
            torch.set_num_threads(before)
        return seen
    return run


def test_a_cpu_trial_that_sees_every_gpu_trains_on_the_cpu_within_its_budget(fake_trial):
    seen = fake_trial(0, [], "0,1,2,3")
    assert seen["device"] == CPU and seen["budget"] is not None and seen["fraction"] is None


def test_a_trial_on_half_a_gpu_trains_there_capped_at_its_share(fake_trial):
    seen = fake_trial(0.5, ["1"], "1")
    assert seen["device"] == torch.device("cuda", 0) and seen["budget"] is None
    assert seen["fraction"] == (pytest.approx(0.5 - 1 / 32), torch.device("cuda", 0))


def test_a_trial_on_a_whole_gpu_is_not_capped(fake_trial):
    seen = fake_trial(1, ["0"], "0")
    assert seen["device"] == torch.device("cuda", 0) and seen["fraction"] is None and seen["budget"] is None


# --- real Ray, logical GPUs: what a worker is given under both settings ------------------------------------

@pytest.fixture(scope="module")
def ray_with_gpus():
    """A small local Ray with 2 logical GPUs (no other test here needs Ray)."""
    import ray
    ray.init(address="local", num_cpus=1, num_gpus=2, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("override", ["0", "1"])
def test_under_either_ray_setting_only_trials_given_a_gpu_use_one(ray_with_gpus, override, monkeypatch):
    ray = ray_with_gpus

    def assigned():  # runs in the worker: what Ray gave it
        import os
        return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")
    # a worker whose node shows it both GPUs, as on a GPU machine; the setting under test
    env = {"env_vars": {"CUDA_VISIBLE_DEVICES": "0,1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": override}}
    cpu_task = ray.remote(num_cpus=0, num_gpus=0, runtime_env=env)(assigned)
    gpu_task = ray.remote(num_cpus=0, num_gpus=1, runtime_env=env)(assigned)
    (cpu_ids, cpu_visible), (gpu_ids, gpu_visible) = ray.get([cpu_task.remote(), gpu_task.remote()])

    # the setting changes what a CPU trial sees: blanked (1) or every GPU (0, Ray's new default)
    assert cpu_ids == [] and cpu_visible == ("" if override == "1" else "0,1")
    # ...but not where it trains, even where CUDA would say a GPU is there
    monkeypatch.setattr(torch.cuda, "is_available", _no_cuda_query)
    assert trial_device(0, cpu_ids, cpu_visible) == CPU
    assert len(gpu_ids) == 1 and gpu_visible == str(gpu_ids[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trial_device(1, gpu_ids, gpu_visible) == torch.device("cuda", 0)


# --- benchmarks/gpu_check.py ----------------------------------------------------------------------------

def test_gpu_check_without_a_gpu_says_so_and_passes():
    from tests.conftest import run_cli
    proc = run_cli("benchmarks/gpu_check.py", env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [
        "gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to check"]


def test_gpu_check_runs_its_per_device_checks_on_the_cpu(capsys):
    """The per-GPU checks' own code, on the CPU at 32 px: train, resume from its checkpoint, ceiling."""
    from benchmarks import gpu_check
    from tests.conftest import WEIGHTS
    weights = ["--weights-dir", str(WEIGHTS)] if (WEIGHTS / "tf_efficientnet_lite0.pth").is_file() else ["--no-pretrained"]
    args = gpu_check.parse(["--input-size", "32", "--batch-size", "16", "--images", "64",
                            "--data-dir", "/nonexistent", "--min-ratio", "0", *weights])
    checks = gpu_check.Checks()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gpu_check.check_device(CPU, args, *gpu_check.data(args), checks)
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert checks.total == 3 and checks.failed == 0, out
    assert "PASS  cpu resume" in out and "reported epochs [2]" in out
