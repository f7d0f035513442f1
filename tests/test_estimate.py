"""The cost estimate's measuring side (planning/estimate.py) and the sampling helper it shares with the
precheck (planning/precheck.py `draw`). Its arithmetic is in tests/test_warm_start.py, the CLI path
in tests/test_search_budget.py."""
from __future__ import annotations

import json

import pytest
import torch

from planning import estimate as est
from planning.define import DefineByRun
from planning.precheck import draw
from spaces import Options, get_space

BASE = {"pretrained": False, "weights_dir": "", "seed": 0, "compile": False}
TINY = get_space("tiny")


def _configs(space, fixed=None, **kw):
    opts = Options(space.backbones, space.max_epochs)
    return draw(DefineByRun(space, opts, fixed or {}, BASE), **kw)


def test_the_precheck_and_the_estimate_draw_the_same_seeded_configs():
    first, sampled = _configs(TINY, draws=5, seed=3)
    again, _ = _configs(TINY, draws=5, seed=3)
    other, _ = _configs(TINY, draws=5, seed=4)
    assert sampled and len(first) == 5 and first == again and first != other


def test_a_space_that_samples_nothing_is_drawn_once():
    configs, sampled = _configs(get_space("mobilenetv2_2stage_128"), draws=50)
    assert not sampled and len(configs) == 1
    fixed = {"backbone": "resnet18", "stage1_lr": 0.01, "freeze_bn": False}
    configs, sampled = _configs(get_space("faults"), fixed, draws=50)
    assert not sampled and len(configs) == 1 and configs[0]["backbone"] == "resnet18"


def _fake_measure(calls):
    def measure(backbone, size, device, precision="auto", batch=64):
        calls.append((backbone, size))
        return dict.fromkeys(est.RATES, 1e-3 * size)
    return measure


def test_speeds_are_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_TUNE_CACHE", str(tmp_path))
    calls, logs = [], []
    monkeypatch.setattr(est, "measure", _fake_measure(calls))
    cpu = torch.device("cpu")
    speeds = est.speeds_for({("resnet18", 32), ("resnet18", 64)}, cpu, 1, log=logs.append)
    assert sorted(calls) == [("resnet18", 32), ("resnet18", 64)] and "timing 2" in logs[0]
    assert speeds["resnet18@64"]["train"] == pytest.approx(0.064)
    est.speeds_for({("resnet18", 32)}, cpu, 1, log=logs.append)
    assert len(calls) == 2 and len(logs) == 1  # from the cache, silently
    cache = json.loads((tmp_path / "speed.json").read_text())
    del cache[f"{est.device_key(cpu, 1)}|batch64"]["resnet18@32"]["head"]
    (tmp_path / "speed.json").write_text(json.dumps(cache))
    est.speeds_for({("resnet18", 32)}, cpu, 1, log=logs.append)
    assert calls[-1] == ("resnet18", 32)  # an entry without every rate is measured again
    est.speeds_for({("resnet18", 32)}, cpu, 2, log=logs.append, precision="bf16")
    assert len(calls) == 4  # another thread count and precision: another key
    est.speeds_for({("resnet18", 32)}, cpu, 2, log=logs.append, precision="bf16", batch=128)
    assert len(calls) == 5  # per-image cost depends on the batch: another key


def test_an_unwritable_speed_cache_only_warns(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("CIFAR_TUNE_CACHE", str(tmp_path / "a_file"))  # no folder can be made under a file
    monkeypatch.setattr(est, "measure", _fake_measure([]))
    logs = []
    speeds = est.speeds_for({("resnet18", 32)}, torch.device("cpu"), 1, log=logs.append)
    assert speeds["resnet18@32"] and logs[-1].startswith("warning: step times not cached")


@pytest.mark.usefixtures("one_thread")
def test_measure_times_every_kind_of_step():
    """A few steps of a real network: a step of the head alone on features is the cheapest."""
    r = est.measure("resnet18", 32, torch.device("cpu"), batch=8)
    assert set(r) == set(est.RATES) and all(v > 0 for v in r.values())
    assert min(r["train"], r["frozen"]) > r["head"]


def test_a_huge_batch_is_timed_at_a_few_hundred_images(tmp_path, monkeypatch):
    """--set batch_size=1000000 made the estimate allocate a million-image batch: the machine ran out
    of memory before the first trial (a new user's probe). Per-image cost is timed on at most 256."""
    monkeypatch.setenv("CIFAR_TUNE_CACHE", str(tmp_path))
    batches = []

    def measure(backbone, size, device, precision="auto", batch=64):
        batches.append(batch)
        return dict.fromkeys(est.RATES, 1e-3)
    monkeypatch.setattr(est, "measure", measure)
    opts = Options(("resnet18",), TINY.max_epochs)
    e = est.estimate(TINY, opts, {"batch_size": 1_000_000, "backbone": "resnet18"}, BASE, [], n_train=100, n_val=20,
                     device=torch.device("cpu"), threads=1, parallel=1, num_samples=2, budget_s=None,
                     rungs=[1], rf=3)
    assert batches and set(batches) == {est.TIMING_BATCH_MAX} and e is not None
