"""Resume: ASHA's rungs rebuilt from the results on disk, and --max-concurrent holding for
restored trials (Ray Tune 2.60 keeps neither)."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from analysis.experiment import load_trials
from search import ray_adapter
from search.progress import SearchLog
from search.ray_adapter import rebuild_asha
from search.restore import ConcurrencyCap, SearchHere, asha_results, restore_tuner
from search.searcher import make_scheduler
from search.storage import Place
from tests.conftest import REPO, run_cli, wait_until_still
from tests.test_faults import fault_env
from trainable.trial import SCRATCH_PREFIX

QUICK = ["--subset", 5, "--backbones", "tf_efficientnet_lite0", "--gpus", 0, "--no-pretrained",
         "--space", "tiny", "--set", "input_size=32", "--grace-period", 1]


def live_search(seed: int, max_t: int = 9, n_trials: int = 8):
    """An uninterrupted ASHA, fed as Tune's controller feeds it; returns it and, per trial, the
    results it saw (what result.json holds), including a trial restarted from a checkpoint."""
    rng = random.Random(seed)
    asha = make_scheduler("asha", max_t, 1, 3)
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(n_trials)]
    epoch = {t.trial_id: 0 for t in trials}
    seen: dict[str, list[dict]] = {t.trial_id: [] for t in trials}
    live = list(trials)
    for t in trials:
        asha.on_trial_add(None, t)
    while live:
        t = rng.choice(live)
        if rng.random() < 0.05 and epoch[t.trial_id] > 1:
            epoch[t.trial_id] -= 1  # restarted from the previous epoch's checkpoint: epoch reported twice
        epoch[t.trial_id] += 1
        acc = float("nan") if rng.random() < 0.03 else round(rng.random(), 3)
        r = {"trial_id": t.trial_id, "epoch": epoch[t.trial_id], "val_acc": acc, "timestamp": 0}
        seen[t.trial_id].append(r)
        if rng.random() < 0.03:  # ended by itself (early stopping) before max_t
            asha.on_trial_complete(None, t, r)
            live.remove(t)
        elif asha.on_trial_result(None, t, r) == TrialScheduler.STOP:
            asha.on_trial_complete(None, t, r)
            live.remove(t)
    return asha, seen


def read_results(exp: Path) -> dict[str, list[dict]]:
    """{trial id: its results in the order reported}, as restore_tuner reads them."""
    return {t.trial_id: t.results for t in load_trials(exp)}


def write_results(exp: Path, seen: dict[str, list[dict]]) -> None:
    for tid, rows in seen.items():
        d = exp / f"trial_{tid}"
        d.mkdir(parents=True)
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def rungs(asha) -> list:
    return [(m, {k: ("nan" if math.isnan(v) else v) for k, v in rec.items()})
            for m, rec in asha._brackets[0]._rungs]


@pytest.mark.parametrize("seed", range(6))
def test_rebuilt_rungs_equal_the_uninterrupted_search(tmp_path, seed):
    live, seen = live_search(seed)
    write_results(tmp_path, seen)
    (tmp_path / "trial_tx").mkdir()  # a trial that never reported
    with open(tmp_path / "trial_t0" / "result.json", "a") as f:
        f.write('{"trial_id": "t0", "epoch": 9, "val_')  # the driver killed mid-line
    rebuilt = make_scheduler("asha", 9, 1, 3)
    counts = rebuild_asha(rebuilt, read_results(tmp_path))
    assert rungs(rebuilt) == rungs(live)
    assert sum(counts.values()) > 0
    # and so the next decision is the same as the live one's, and a fresh ASHA's differs
    newcomer, low = SimpleNamespace(trial_id="new"), {"epoch": 1, "val_acc": -1.0}
    for s in (live, rebuilt):
        s.on_trial_add(None, newcomer)
    fresh = make_scheduler("asha", 9, 1, 3)
    fresh.on_trial_add(None, newcomer)
    assert rebuilt.on_trial_result(None, newcomer, low) == live.on_trial_result(None, newcomer, low) == "STOP"
    assert fresh.on_trial_result(None, newcomer, low) == "CONTINUE"


def test_results_without_time_or_metric_are_no_decision(tmp_path):
    write_results(tmp_path, {"a": [{"trial_id": "a", "epoch": 1}, {"trial_id": "a", "val_acc": 0.5},
                                   {"trial_id": "a", "epoch": 1, "val_acc": None}],
                             "b": [{"trial_id": "b", "epoch": 1, "val_acc": 0.3}]})
    asha = make_scheduler("asha", 3, 1, 3)
    assert rebuild_asha(asha, read_results(tmp_path)) == {3: 0, 1: 1}  # only b counts


def test_asha_neither_prunes_nor_records_a_screen_trial():
    """A screen trial (a fraction of the data) runs its whole plan and stays out of the rungs full-fidelity
    trials are judged by; Ray's ASHA put it there and cut it by val_acc at its first rung."""
    asha = make_scheduler("asha", 9, 1, 3)
    screen = [SimpleNamespace(trial_id=f"s{i}", config={"train_fraction": 0.2}) for i in range(4)]
    full = [SimpleNamespace(trial_id=f"f{i}", config={"train_fraction": 1.0}) for i in range(2)]
    for t in screen + full:
        asha.on_trial_add(None, t)
    for i, t in enumerate(screen):  # 0.9 first, then weaker ones that a plain ASHA stops at its first rung
        for epoch in (1, 3, 9):
            assert asha.on_trial_result(None, t, {"epoch": epoch, "val_acc": 0.9 - 0.2 * i}) == "CONTINUE"
        asha.on_trial_complete(None, t, {"epoch": 9, "val_acc": 0.9 - 0.2 * i})
    assert all(not recorded for _, recorded in asha._brackets[0]._rungs)
    # a full-fidelity trial is judged by full-fidelity trials alone: the first is in an empty rung
    assert asha.on_trial_result(None, full[0], {"epoch": 1, "val_acc": 0.3}) == "CONTINUE"
    assert asha._brackets[0]._rungs[-1][1] == {"f0": 0.3}
    plain = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=9, grace_period=1,
                          reduction_factor=3)
    for t in screen[:2] + full[:1]:
        plain.on_trial_add(None, t)
    for t, v in ((screen[0], 0.9), (screen[1], 0.7)):
        plain.on_trial_result(None, t, {"epoch": 1, "val_acc": v})
    assert plain.on_trial_result(None, full[0], {"epoch": 1, "val_acc": 0.3}) == "STOP"  # what this guards


def test_a_resume_rebuilds_the_rungs_from_full_fidelity_trials_alone(tmp_path):
    write_results(tmp_path, {"s": [{"trial_id": "s", "epoch": 1, "val_acc": 0.9}],
                             "f": [{"trial_id": "f", "epoch": 1, "val_acc": 0.3}]})
    (tmp_path / "trial_s" / "params.json").write_text(json.dumps({"train_fraction": 0.2}))
    (tmp_path / "trial_f" / "params.json").write_text(json.dumps({"train_fraction": 1.0}))
    assert set(asha_results(tmp_path)) == {"f"}
    asha = make_scheduler("asha", 9, 1, 3)
    assert rebuild_asha(asha, asha_results(tmp_path))[1] == 1


class FakeController:
    def __init__(self):
        self.trials: list[Trial] = []

    def get_trials(self):
        return self.trials

    def add(self, cap, status=Trial.PENDING):  # as TuneController.add_trial does
        t = SimpleNamespace(trial_id=str(len(self.trials)), status=status)
        t.set_status = lambda s, t=t: setattr(t, "status", s)
        self.trials.append(t)
        cap.on_trial_add(self, t)
        return t


@pytest.mark.parametrize("limit", [1, 2])
def test_cap_parks_restored_trials_over_the_limit(limit):
    ctl, cap = FakeController(), ConcurrencyCap(make_scheduler("fifo", 4, 1, 3), limit)
    done = ctl.add(cap, Trial.TERMINATED)
    added = [ctl.add(cap) for _ in range(4)]
    assert [t.status for t in added] == [Trial.PENDING] * limit + [Trial.PAUSED] * (4 - limit)
    for t in added[:limit]:
        t.status = Trial.RUNNING
    assert cap.choose_trial_to_run(ctl) is None  # full
    added[0].status = Trial.TERMINATED
    assert cap.choose_trial_to_run(ctl) is added[limit]  # a slot freed: the first parked one
    assert done.status == Trial.TERMINATED


def _intervals(exp: Path) -> list[tuple[float, float, str]]:
    """Per trial, the wall time of its run after the resume (its last worker process)."""
    out = []
    for tid, rows in read_results(exp).items():
        last = [r for r in rows if r["pid"] == rows[-1]["pid"]]
        out.append((last[0]["timestamp"] - last[0]["time_this_iter_s"], last[-1]["timestamp"], tid))
    return sorted(out)


def _trainable(config):
    pass


def test_a_restored_tuner_gets_this_runs_callbacks_stopper_cap_and_searcher(tmp_path):
    """What tuner.pkl pickled when the search began (its callbacks name the folder it began in) is
    replaced; no Ray is needed to restore a Tuner, only to fit it."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch
    searcher = OptunaSearch(space=lambda t: {"a": t.suggest_float("a", 0, 1)}, metric="val_acc", mode="max")
    tune.Tuner(_trainable, tune_config=tune.TuneConfig(search_alg=searcher, scheduler=make_scheduler("asha", 4, 1, 2)),
               run_config=tune.RunConfig(storage_path=str(tmp_path), name="e", callbacks=[SearchLog(tmp_path / "old")]))
    now, stop = SearchLog(tmp_path / "e"), object()
    tuner = restore_tuner(Place(tmp_path / "e"), _trainable, 1, [now], stop)
    tc, rc = ray_adapter.configs(tuner)
    assert rc.callbacks == [now] and rc.stop is stop
    assert isinstance(tc.scheduler, ConcurrencyCap) and tc.scheduler.limit == 1
    assert isinstance(tc.search_alg, SearchHere) and tc.search_alg.here == (str(tmp_path), "e")


def test_max_concurrent_holds_for_trials_restored_as_errored(tmp_path, data_dir):
    args = ["--num-samples", 2, "--max-concurrent", 1, "--max-failures", 0, "--scheduler", "fifo",
            "--max-epochs", 2,
            "--data-dir", data_dir, "--storage-path", tmp_path, "--name", "errored", *QUICK,
            "--set", "input_size=128"]  # after QUICK's 32 px: epochs of seconds (64 px took 1.1 s), so an overlap shows
    run_cli("run_search.py", *args, check=True, env=fault_env("crash@2"))
    exp = tmp_path / "errored"
    assert all([r["epoch"] for r in rows] == [1] for rows in read_results(exp).values())  # all crashed
    run_cli("run_search.py", "--resume", "--name", "errored", "--storage-path", tmp_path,
            "--num-samples", 2, "--grace-period", 1, check=True)
    runs = _intervals(exp)
    assert len(runs) == 2 and all(b - a > 1.5 for a, b, _ in runs), runs  # long enough to overlap
    for (_, end, a), (start, _, b) in zip(runs, runs[1:]):
        assert start >= end - 1.0, f"trials {a} and {b} trained at the same time: {runs}"  # 1 s: int timestamps


def test_asha_after_kill_and_resume_sees_the_earlier_results(tmp_path, data_dir):
    args = ["--num-samples", 4, "--max-concurrent", 1, "--max-epochs", 2, "--scheduler", "asha",
            "--data-dir", data_dir, "--storage-path", tmp_path, "--name", "killed", *QUICK]
    exp = tmp_path / "killed"
    driver = subprocess.Popen([sys.executable, "run_search.py", *map(str, args)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        at_1 = {t for t, rows in read_results(exp).items() if any(r["epoch"] == 1 for r in rows)}
        if len(at_1) >= 2:
            break
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and its local Ray, like a lost machine
    driver.wait()
    wait_until_still(exp)  # a worker of the killed search may still be writing
    at_1 = {t for t, rows in read_results(exp).items() if any(r["epoch"] == 1 for r in rows)}
    assert len(at_1) >= 2
    (exp / f"{SCRATCH_PREFIX}left-by-a-kill").mkdir(exist_ok=True)  # a checkpoint the kill caught before Tune copied it
    proc = run_cli("run_search.py", "--resume", "--name", "killed", "--storage-path", tmp_path,
                   "--num-samples", 4, "--grace-period", 1, check=True)
    assert not list(exp.glob(f"{SCRATCH_PREFIX}*"))  # the resume removed it
    assert f"ASHA's rungs rebuilt from the results on disk: epoch 1: {len(at_1)} trials" in proc.stdout
    # the rebuilt scheduler is capped (test_max_concurrent_holds_for_trials_restored_as_errored shows it holds)
    assert "resume: at most 1 trial(s) at once, restored ones included" in proc.stdout
    assert len(read_results(exp)) == 4
