"""Tests for analysis/experiment.py on a hand-built experiment folder in Tune's on-disk layout."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from analysis.command import PROJECT, python, shown
from analysis.experiment import (
    SETTINGS_FILE,
    TrialRecord,
    export_best,
    leaderboard,
    load_trials,
    rank,
    read_best_config,
    read_settings,
    write_settings,
)
from trainable.config import TrialConfig
from trainable.errors import UserError

NAN = float("nan")


def _config(**kw) -> dict:
    return TrialConfig.from_dict({"stage1_epochs": 1, "stage2_epochs": 3, **kw}).to_dict()  # 4 epochs


def _row(trial_id: str, epoch: int, acc: float, **kw) -> str:
    return json.dumps({"trial_id": trial_id, "epoch": epoch, "val_acc": acc,
                       "status": "ok", "training_iteration": epoch, **kw})


def _trial(exp: Path, name: str, config: dict, accs: list[float] | None = None, *,
           extra_lines: list[str] = (), error: str | None = None) -> Path:
    d = exp / name
    d.mkdir(parents=True)
    (d / "params.json").write_text(json.dumps(config))
    if accs is not None:
        tid = name.removeprefix("trial_")
        lines = [_row(tid, e, a) for e, a in enumerate(accs, start=1)] + list(extra_lines)
        (d / "result.json").write_text("".join(line + "\n" for line in lines))
    if error is not None:
        (d / "error.txt").write_text(error)
    return d


TRACEBACK = ("Failure # 1 (occurred at 2025-01-01_00-00-00)\n"
             "ray.exceptions.RayTaskError(RuntimeError): ray::tune_trial() (pid=1)\n"
             "  File \"trial.py\", line 3, in run_trial\n"
             "RuntimeError: CUDA out of memory\n\n")


@pytest.fixture
def exp(tmp_path) -> Path:
    e = tmp_path / "my exp"  # a space in the path: the retrain command must quote it
    # peaks at 0.9 in epoch 2, ends at 0.5: the best trial by its best epoch
    _trial(e, "trial_peak", _config(backbone="resnet18"), [0.3, 0.9, 0.6, 0.5])
    # steady climber, last epoch 0.8 (higher than the peak's last), one NaN epoch
    _trial(e, "trial_steady", _config(backbone="mobilenetv2_100"), [0.4, NAN, 0.7, 0.8])
    # scored 0.95 and then diverged: never a candidate
    _trial(e, "trial_diverged", _config(stage1_lr=1.0), [0.95],
           extra_lines=[_row("diverged", 2, 0.0, status="diverged",
                             error="non-finite training loss in epoch 2")])
    # ran out of memory in epoch 2 (trainable.trial's failure row): never a candidate either
    _trial(e, "trial_oom", _config(batch_size=4096), [0.97],
           extra_lines=[_row("oom", 2, 0.0, status="oom", error="out of memory in epoch 2")])
    # crashed for good after one epoch
    _trial(e, "trial_failed", _config(), [0.2], error=TRACEBACK)
    # crashed once, recovered from its checkpoint and finished: Tune still leaves an error.txt
    _trial(e, "trial_recovered", _config(), [0.1, 0.2, 0.3, 0.4], error=TRACEBACK)
    # ASHA stopped it after 1 of 4 epochs
    _trial(e, "trial_stopped", _config(), [0.15])
    # never reported
    _trial(e, "trial_pending", _config())
    # the driver was killed mid-write: the last line is cut short
    _trial(e, "trial_truncated", _config(), [0.05, 0.25], extra_lines=['{"trial_id": "truncated", "epo'])
    (e / "not_a_trial").mkdir()  # no params.json: ignored
    write_settings(e, {"data_dir": "/data/cifar dir", "space": "tiny"})
    return e


def _by_id(trials):
    return {t.trial_id: t for t in trials}


def test_load_trials(exp):
    trials = _by_id(load_trials(exp))
    assert set(trials) == {"peak", "steady", "diverged", "failed", "recovered", "stopped",
                           "pending", "truncated", "oom"}  # no result row: the id its folder is named after
    assert trials["peak"].config["backbone"] == "resnet18"
    assert [r["val_acc"] for r in trials["peak"].results] == [0.3, 0.9, 0.6, 0.5]
    assert trials["pending"].results == []
    assert trials["failed"].error == "RuntimeError: CUDA out of memory"


def test_best_epoch_not_last(exp):
    trials = _by_id(load_trials(exp))
    assert trials["peak"].best["val_acc"] == 0.9 and trials["peak"].best["epoch"] == 2
    assert trials["steady"].best["val_acc"] == 0.8 and trials["steady"].best["epoch"] == 4
    ranked = [t.trial_id for t in rank(list(trials.values()))]
    assert ranked[:2] == ["peak", "steady"]


def test_diverged_never_wins(exp):
    trials = _by_id(load_trials(exp))
    d, oom = trials["diverged"], trials["oom"]
    assert d.status == "diverged" and d.best is None  # though it once scored 0.95
    assert oom.status == "oom" and oom.best is None  # though it once scored 0.97
    ranked = [t.trial_id for t in rank(list(trials.values()))]
    assert ranked == ["peak", "steady", "recovered", "truncated", "failed", "stopped"]


def test_statuses(exp):
    status = {t.trial_id: t.status for t in load_trials(exp)}
    assert status == {"peak": "completed", "steady": "completed", "diverged": "diverged",
                      "failed": "errored", "recovered": "completed", "stopped": "pruned",
                      "pending": "not started", "truncated": "pruned", "oom": "oom"}


def test_epochs(exp):
    trials = _by_id(load_trials(exp))
    assert trials["peak"].planned_epochs == 4 and trials["peak"].epochs_run == 4
    assert trials["stopped"].epochs_run == 1 and trials["pending"].epochs_run == 0


def test_truncated_line_tolerated(exp):
    t = _by_id(load_trials(exp))["truncated"]
    assert [r["epoch"] for r in t.results] == [1, 2]
    assert t.best["val_acc"] == 0.25 and t.epochs_run == 2


def test_export_best(exp):
    out = export_best(exp, load_trials(exp))
    assert out["trial_id"] == "peak"
    assert out["best_val_acc"] == 0.9 and out["best_epoch"] == 2 and out["epochs_run"] == 4
    assert out["config"] == _config(backbone="resnet18")
    # the interpreter running now (a bare `python` may have no torch); analyze.py's defaults left out
    assert shlex.split(out["retrain_command"]) == [python(), shown(PROJECT / "analyze.py"), str(exp)]
    from_yaml = yaml.safe_load((exp / "best_config.yaml").read_text())
    from_json = json.loads((exp / "best_config.json").read_text())
    assert from_yaml == from_json == out
    assert list(from_yaml) == ["trial_id", "best_val_acc", "best_epoch", "epochs_run",
                               "retrain_command", "config"]


def test_best_config_round_trip(exp):
    export_best(exp, load_trials(exp))
    want = _config(backbone="resnet18")
    for name in ("best_config.yaml", "best_config.json"):
        cfg, _ = read_best_config(exp / name)
        assert cfg == want
        assert TrialConfig.from_dict(cfg) == TrialConfig.from_dict(want)


def test_export_without_settings_file(exp):
    (exp / SETTINGS_FILE).unlink()
    assert read_settings(exp) == {}
    out = export_best(exp, load_trials(exp))
    assert "--data-dir" not in out["retrain_command"]


def test_export_with_no_usable_trial(tmp_path):
    e = tmp_path / "exp"
    _trial(e, "trial_pending", _config())
    _trial(e, "trial_diverged", _config(), [0.5],
           extra_lines=[_row("diverged", 2, 0.0, status="diverged")])
    _trial(e, "trial_nan", _config(), [NAN])
    with pytest.raises(UserError) as err:
        export_best(e, load_trials(e))
    msg = str(err.value)
    assert "\n" not in msg and "holds no trial with a finished epoch" in msg
    assert not (e / "best_config.yaml").exists()


def test_empty_experiment_folder(tmp_path):
    assert load_trials(tmp_path) == []
    with pytest.raises(UserError):
        export_best(tmp_path, [])


def test_leaderboard(exp):
    lines = leaderboard(load_trials(exp)).splitlines()
    assert lines[0].split()[:6] == ["#", "trial", "val_acc", "@epoch", "epochs", "status"]
    assert set(lines[1].replace(" ", "")) == {"-"}  # the dashed rule every text table has
    first, second = lines[2].split(), lines[3].split()
    assert first[:6] == ["1", "peak", "0.9000", "2", "4/4", "completed"] and first[6] == "resnet18"
    assert second[:3] == ["2", "steady", "0.8000"]
    tail = "\n".join(lines)
    assert "diverged: diverged (non-finite training loss in epoch 2)" in tail
    assert "oom: oom (out of memory in epoch 2)" in tail and "  pending: not started" in tail
    assert "3 trial(s) without a usable result" in tail
    assert leaderboard(load_trials(exp), top=1).count("completed") == 1


def test_read_best_config_plain_mapping(tmp_path):
    p = tmp_path / "hp.yaml"
    p.write_text("backbone: resnet18\nbatch_size: '64'\n")
    assert read_best_config(p) == ({"backbone": "resnet18", "batch_size": "64"}, None)


@pytest.mark.parametrize("text, fragment", [
    ("config: [1, 2\n", "is not valid YAML at line"),
    ("- a\n- b\n", "is not a mapping"),
    ("config: {stage3_epochs: -1}\n", "bad trial config: stage epochs must be >= 0"),
    ("config: {learning_rate: 0.1}\n", "unknown hyper-parameter(s) learning_rate"),
    # what a user passes by mistake: search_settings.yaml (its config: is a path), a list, YAML's int keys
    ("config: runs/x/best.yaml\nspace: cpu\n", "`config:` is a str, not a mapping of hyper-parameters"),
    ("config: [1, 2]\n", "`config:` is a list, not a mapping"),
    ("config: {1: 2}\n", "unknown hyper-parameter(s) 1"),
    ("best_epoch: one\nconfig: {batch_size: 64}\n", "best_epoch 'one' is not an epoch number"),
    ("best_epoch: 0\nconfig: {batch_size: 64}\n", "best_epoch 0 is not an epoch number"),
    ("best_epoch: 2.5\nconfig: {batch_size: 64}\n", "best_epoch 2.5 is not an epoch number"),
])
def test_read_best_config_errors(tmp_path, text, fragment):
    p = tmp_path / "best_config.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as err:
        read_best_config(p)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="cannot read config"):
        read_best_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("raw, fragment", [
    (b"\xff\xfe\x00\x01binary", "is not UTF-8 text"),
    ("config: {backbone: r\xe9snet}\n".encode("latin-1"), "is not UTF-8 text"),
    ("config: {batch_size: 64}\n".encode("utf-16"), "is not UTF-8 text"),
])
def test_a_config_file_in_another_encoding_is_one_line(tmp_path, raw, fragment):
    """Every reader of a YAML file the user hands over (or the experiment holds) goes through load_yaml."""
    from analysis.experiment import read_settings
    from planning.settings import load_yaml_settings
    p = tmp_path / "x.yaml"
    p.write_bytes(raw)
    for read in (lambda: read_best_config(p), lambda: load_yaml_settings(str(p))):
        with pytest.raises(UserError) as err:
            read()
        assert fragment in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "search_settings.yaml").write_bytes(raw)
    with pytest.raises(UserError, match=r"the experiment's settings .* is not UTF-8 text \(.*\): restore the file"):
        read_settings(tmp_path)
    with pytest.raises(UserError, match="is a folder, not a file"):
        read_best_config(tmp_path)


def test_equal_val_acc_is_broken_by_the_lower_val_loss(tmp_path):
    """A duel's seed exported a 3-stage plan over the recipe it tied on 250 val images, though its
    val_loss was 3.33 against 2.83: equal accuracies are ranked by the finer measure."""
    row = {"epoch": 2, "training_iteration": 2, "status": "ok"}
    cfg = {"stage1_epochs": 1, "stage2_epochs": 1, "stage3_epochs": 0}
    first = TrialRecord("a", tmp_path / "a", cfg, [{**row, "val_acc": 0.36, "val_loss": 3.33}])
    second = TrialRecord("b", tmp_path / "b", cfg, [{**row, "val_acc": 0.36, "val_loss": 2.83}])
    better = TrialRecord("c", tmp_path / "c", cfg, [{**row, "val_acc": 0.37, "val_loss": 4.0}])
    no_loss = TrialRecord("d", tmp_path / "d", cfg, [{**row, "val_acc": 0.36}])
    assert [t.trial_id for t in rank([no_loss, first, second, better])] == ["c", "b", "a", "d"]


def test_a_trial_cut_short_or_pruned_is_exported_only_when_no_trial_ran_its_whole_plan(tmp_path):
    """A duel's (a) on seed 3 (ninth session) exported a trial the time budget cut after epoch 2 of 3 (val
    0.361) over the recipe that ran all 3 (0.346), though the searcher's incumbent is full-fidelity only."""
    from analysis.outcome import OUT_OF_BUDGET
    cfg = {"stage1_epochs": 3, "stage2_epochs": 0, "stage3_epochs": 0}
    rows = [{"epoch": e, "training_iteration": e, "status": "ok", "val_loss": 3.0} for e in (1, 2, 3)]
    whole = TrialRecord("whole", tmp_path / "w", cfg, [{**r, "val_acc": v} for r, v in zip(rows, (0.16, 0.30, 0.346))])
    cut = TrialRecord("cut", tmp_path / "c", cfg, [{**r, "val_acc": v} for r, v in zip(rows[:2], (0.23, 0.361))],
                      ended_by_search=OUT_OF_BUDGET)
    pruned = TrialRecord("pruned", tmp_path / "p", cfg, [{**r, "val_acc": v} for r, v in zip(rows[:2], (0.3, 0.37))])
    assert (whole.status, cut.status, pruned.status) == ("completed", OUT_OF_BUDGET, "pruned")
    assert [t.trial_id for t in rank([cut, pruned, whole])] == ["whole", "pruned", "cut"]
    assert export_best(tmp_path, [cut, pruned, whole])["trial_id"] == "whole"
    assert export_best(tmp_path, [cut, pruned])["trial_id"] == "pruned"  # none whole: the best of the rest


def test_a_search_that_ended_in_its_screen_exports_what_the_screen_would_promote(tmp_path):
    """The fourteenth session's seed 8 at 0.5x: the budget ended with the screen; the export took the screen trial
    with the best val_acc (0.03, val_loss 4.86: 23.2 % test) over the one the screen ranks first (0.025, 4.58)."""
    cfg = {"stage1_epochs": 3, "stage2_epochs": 0, "stage3_epochs": 0, "train_fraction": 0.111}
    rows = lambda acc, loss: [{"epoch": e, "training_iteration": e, "status": "ok", "val_acc": acc,  # noqa: E731
                               "val_loss": loss + 0.1 * (3 - e)} for e in (1, 2, 3)]
    noisy = TrialRecord("noisy", tmp_path / "n", cfg, rows(0.03, 4.858))
    frozen = TrialRecord("frozen", tmp_path / "f", cfg, rows(0.025, 4.582))
    cut = TrialRecord("cut", tmp_path / "c", cfg, rows(0.04, 4.0)[:1])  # a rung's value: ranks after whole plans
    assert [t.trial_id for t in rank([noisy, cut, frozen])] == ["frozen", "noisy", "cut"]
    # the calibrated loss first where the trials report it (trainable.loop.evaluate): it outranks the plain loss
    smoothed = TrialRecord("smoothed", tmp_path / "s", cfg, [{**r, "val_cal_loss": 4.60} for r in rows(0.005, 4.55)])
    sharp = TrialRecord("sharp", tmp_path / "h", cfg, [{**r, "val_cal_loss": 4.57} for r in rows(0.02, 4.79)])
    assert [t.trial_id for t in rank([smoothed, sharp])] == ["sharp", "smoothed"]
    # a full-data trial the budget cut at epoch 1 still ranks above the screen
    partial = TrialRecord("partial", tmp_path / "p", {**cfg, "train_fraction": 1.0}, rows(0.02, 4.7)[:1])
    assert rank([noisy, frozen, partial])[0].trial_id == "partial"
