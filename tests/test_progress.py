"""search/progress.py: the progress line and trial table on fake trials, then wired into a real Tuner
(together with search/tensorboard.py) the way search/run.py wires them."""
from __future__ import annotations

import glob
import os
import time

import pytest

from analysis.experiment import text_table
from analysis.outcome import COMPLETED, RUNNING
from search.progress import PARAM_COLUMNS, Progress, SearchLog, quiet_ray_console, table_rows


class FakeTrial:
    def __init__(self, trial_id, tune_status, epoch=0, planned=3, best=None, seconds=None, **result):
        self.trial_id, self.status = trial_id, tune_status
        self.config = {"backbone": "resnet18", "stage1_epochs": 1,
                       "stage2_epochs": planned - 1, "stage1_lr": 0.01, "stage3_lr": 0.5}
        self.last_result = {"epoch": epoch, "stage": 1 + (epoch > 1), "val_acc": best,
                            "best_val_acc": best, "time_total_s": seconds, **result} if epoch else {}


def trials():
    return [FakeTrial("done", "TERMINATED", epoch=3, best=0.30, seconds=100),
            FakeTrial("asha", "TERMINATED", epoch=1, best=0.10, seconds=20),
            FakeTrial("nan", "TERMINATED", epoch=2, best=0.0, seconds=30, status="diverged"),
            FakeTrial("crash", "ERROR", epoch=1, best=0.12),
            FakeTrial("run", "RUNNING", epoch=2, best=0.25),
            FakeTrial("wait", "PENDING")]


def test_counts_best_and_time_left():
    p = Progress.of(trials(), total=10)
    # mean trial 60 s (100 s, 20 s); 5 not started; the running one has run 0 s of its 60
    assert p.eta(parallel=2) == pytest.approx((5 * 60 + 60) / 2)
    timed = Progress.of(trials(), total=10, seconds={"done": 130, "asha": 30, "run": 50})
    assert timed.eta(parallel=2) == pytest.approx((5 * 80 + 30) / 2)  # wall times win over Tune's
    line = p.line(elapsed=125, parallel=2)
    assert line.startswith("[search] 4/10 trials finished")  # 2 finished, 2 failed: diverged counts as failed
    for part in ("1 running", "1 pruned", "2 failed", "best val_acc 0.3000 (done)",
                 "elapsed 2m05s", "about 3m00s left"):
        assert part in line
    assert "\n" not in line


def test_the_trial_being_reported_counts_as_ended():
    ts = trials()
    running = ts[4]
    ended = Progress.of(ts, 10, ending=(running, "TERMINATED")).line(5, 1)
    assert "5/10 trials finished | 0 running | 2 pruned | 2 failed" in ended
    failed = Progress.of(ts, 10, ending=(running, "ERROR")).line(5, 1)
    assert "5/10 trials finished | 0 running | 1 pruned | 3 failed" in failed
    first = Progress.of([FakeTrial("r", "RUNNING", epoch=1, best=0.1)], 4).line(5, 1)
    assert "known after the first trial ends" in first


def test_progress_line_prints_on_events_and_at_most_every_interval(tmp_path, capsys):
    cb = SearchLog(tmp_path, every_s=1000)
    cb.setup(total_num_samples=6)
    ts = trials()
    cb.on_step_end(iteration=1, trials=ts)
    assert capsys.readouterr().out == ""  # too soon
    cb.on_trial_complete(iteration=2, trials=ts, trial=ts[4])
    cb.on_trial_error(iteration=3, trials=ts, trial=ts[5])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith("[search] ") for line in out)
    cb.last_line -= 2000
    cb.on_step_end(iteration=4, trials=ts)
    assert capsys.readouterr().out.startswith("[search] ")
    cb.last_table -= 2000
    cb.on_step_end(iteration=5, trials=ts)
    out = capsys.readouterr().out
    assert out.startswith("Trial status: ") and "s1_lr" in out


def test_table_has_the_chosen_columns():
    head, rows = table_rows(trials())
    assert head[:3] == ["trial", "status", "backbone"] and head[-1] == "best"
    assert [r[0] for r in rows] == ["run", "done", "asha", "nan", "wait", "crash"]
    assert rows[2][1] == "pruned"
    assert rows[1][PARAM_COLUMNS.index("stage3_lr") + 2] == "-"  # a 2-stage trial has no stage 3
    assert rows[3][1] == "diverged"
    lines = text_table(head, rows).splitlines()
    assert lines[0].index("backbone") == lines[2].index("resnet18")  # columns line up


def test_the_printed_table_counts_every_trial_and_shows_the_first_rows(monkeypatch, tmp_path, capsys):
    import search.progress
    monkeypatch.setattr(search.progress, "MAX_ROWS", 4)
    cb = SearchLog(tmp_path)
    cb.print_table(trials())
    during = capsys.readouterr().out.splitlines()
    cb.print_table(trials(), cut={})  # at the search's end: every trial
    end = capsys.readouterr().out.splitlines()
    assert during[0].startswith("Trial status: 1 completed | 1 diverged | 1 errored | 1 pending | 1 pruned | 1 running |")
    assert len(during) == 1 + 2 + 4 + 1 and during[-1] == "... and 2 more trials"  # status, header and rule, rows
    assert len(end) == 1 + 2 + 6 and not any("more trials" in line for line in end)


def test_table_shows_an_explicit_augment_list_and_one_lr_format():
    t, r = FakeTrial("rec", "RUNNING", epoch=1, best=0.0), FakeTrial("drawn", "RUNNING", epoch=1, best=0.5)
    t.config.update(augment="flip,rotate=15", aug_strength=0.5, stage1_lr=0.001, stage2_lr=1e-05)
    r.config.update(aug_strength=0.5, stage1_lr=0.01, stage2_lr=0.00025)
    head, rows = table_rows([t, r])
    cell = {row[0]: dict(zip(head, row)) for row in rows}
    assert cell["rec"]["aug"] == "flip,rotate=15" and cell["drawn"]["aug"] == "0.5"
    assert (cell["rec"]["s1_lr"], cell["rec"]["s2_lr"]) == ("1e-3", "1e-5")
    assert (cell["drawn"]["s1_lr"], cell["drawn"]["s2_lr"]) == ("1e-2", "2.5e-4")
    assert cell["rec"]["val_acc"] == "0.0000" and cell["drawn"]["val_acc"] == "0.5000"  # accuracies: 4 decimals


def test_rays_console_stays_quiet(monkeypatch):
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    quiet_ray_console()
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # the engine that prints nothing at verbose=0


def test_ray_lines_that_contradict_ours_are_dropped():
    """Ray's own loggers, as Ray 2.60 words these lines; other warnings of theirs still show."""
    import logging
    quiet_ray_console()
    seen: list[str] = []
    catch = logging.Handler()
    catch.emit = lambda record: seen.append(record.getMessage())
    loggers = [logging.getLogger(n) for n in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")]
    for lg in loggers:
        lg.addHandler(catch)
    try:
        tune_log, analysis_log = loggers
        tune_log.warning("Experiment has been interrupted, but the most recent state was saved.\n"
                         "Resume experiment with: Tuner.restore(path=\"/x\", trainable=...)")
        analysis_log.warning("Failed to fetch metrics for 1 trial(s):\n- tune_trial_1: FileNotFoundError("
                             "'Could not fetch metrics for tune_trial_1: both result.json and progress.csv were not found')")
        analysis_log.warning("Failed to fetch metrics for 1 trial(s):\n- tune_trial_2: ValueError('bad csv')")
        tune_log.warning("Trials did not complete: [tune_trial_3]")
    finally:
        for lg in loggers:
            lg.removeHandler(catch)
    text = "\n".join(seen)
    assert "Tuner.restore" not in text and "tune_trial_1" not in text
    assert "tune_trial_2" in text and "Trials did not complete" in text


def _trainable(config):
    from ray import tune
    best = 0.0
    for epoch in range(1, config["stage1_epochs"] + config["stage2_epochs"] + 1):
        acc = config["stage1_lr"] * epoch
        best = max(best, acc)
        time.sleep(0.2)
        if config.get("crash") and epoch == 2:
            raise RuntimeError("injected trial failure")
        tune.report({"epoch": epoch, "stage": 1 if epoch == 1 else 2, "lr": 0.1, "train_loss": 1.0,
                     "val_acc": acc, "val_loss": 1.0, "best_val_acc": best, "status": "ok"})


def test_wired_into_a_real_tuner(tmp_path, capfd):
    """The console and TensorBoard callbacks in a real Tuner with ASHA, as search/run.py wires them."""
    import ray
    from ray import tune
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from search.searcher import make_scheduler
    from search.tensorboard import SCALARS, EpochTensorBoard
    os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
    quiet_ray_console()
    space = {"stage1_lr": tune.grid_search([0.01, 0.02, 0.1, 0.2]), "stage1_epochs": 1, "stage2_epochs": 2,
             "backbone": "resnet18", "crash": tune.grid_search([False, True])}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tune.Tuner(_trainable, param_space=space,
                   tune_config=tune.TuneConfig(scheduler=make_scheduler("asha", 3, 1, 2)),
                   run_config=tune.RunConfig(name="console", storage_path=str(tmp_path),
                                             callbacks=[EpochTensorBoard(), SearchLog(tmp_path, every_s=1)],
                                             verbose=0, progress_reporter=None)).fit()
    finally:
        ray.shutdown()
    out = capfd.readouterr().out
    # half the trials fail: the console survives it (a second Ray 2.60 reporter did not) and counts them
    assert "[search] 8/8 trials finished" in out and "| 4 failed |" in out and "| done" in out
    assert "s1_lr" in out and "best" in out  # our table is Tune's console
    assert "started with configuration" not in out  # no per-trial config dumps
    runs = glob.glob(str(tmp_path / "console" / "*" / "events.out.tfevents.*"))
    assert len(runs) == 8  # one event file per trial: Tune's own TensorBoard logger was replaced
    with_hparams = 0
    for f in runs:
        ea = EventAccumulator(f)
        ea.Reload()
        if set(ea.Tags()["scalars"]) == set(SCALARS) - {"val_coarse_acc", "val_coarse_head_acc"}:  # not reported here
            with_hparams += bool(ea.PluginTagToContent("hparams"))
    assert with_hparams >= 4  # the trials that ran to the end


def test_eta_uses_the_cost_estimate_until_a_trial_ends():
    p = Progress(total=4, runs=[(RUNNING, 30.0), (RUNNING, 10.0)], prior_trial_s=100.0)
    assert p.eta(parallel=2) == pytest.approx((2 * 100 + 70 + 90) / 2)  # 2 not started + the rest of 2
    assert "about 3m00s left" in p.line(elapsed=40, parallel=2)
    p.runs.append((COMPLETED, 50.0))  # the first measured trial replaces the estimate
    assert p.eta(parallel=2) == pytest.approx((1 * 50 + 20 + 40) / 2)
    assert Progress(total=4).eta(1) is None


def test_progress_line_shows_the_time_budget_left():
    line = Progress(total=None, runs=[(RUNNING, None)]).line(elapsed=10, parallel=1, budget_left=125)
    assert "time budget: 2m05s left" in line
    bounded = Progress(total=3, prior_trial_s=1000.0)
    assert "time budget: 1m00s left" in bounded.line(elapsed=0, parallel=1, budget_left=60)
