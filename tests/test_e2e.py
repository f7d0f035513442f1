"""The whole job through the CLIs, as a user runs it: search (tiny space, 2 logical GPUs; the
`e2e_search` fixture in conftest.py, which test_report.py reads too), then analyze."""
from __future__ import annotations

import json
import shutil
from dataclasses import fields

import pytest
import torch
import yaml

import analyze
from analysis.experiment import load_trials
from tests.conftest import E2E_SAMPLES as SAMPLES
from tests.conftest import run_cli
from trainable.config import TrialConfig


def test_search_completes_with_every_trial(e2e_search):
    exp, proc = e2e_search
    trials = load_trials(exp)
    assert len(trials) == SAMPLES
    assert all(t.status in ("completed", "pruned") for t in trials), [t.status for t in trials]
    assert "best: trial" in proc.stdout


def test_a_worker_runs_more_than_one_trial(e2e_search):
    """Tune reuses a finished trial's worker process (reuse_actors): fewer processes than trials."""
    trials = load_trials(e2e_search[0])
    assert len({r["pid"] for t in trials for r in t.results}) < len(trials)


def test_asha_pruned_a_trial(e2e_search):
    trials = load_trials(e2e_search[0])
    assert any(t.status == "pruned" for t in trials)
    assert any(t.status == "completed" for t in trials)


def test_params_json_is_complete_and_rerunnable(e2e_search):
    for t in load_trials(e2e_search[0]):
        assert set(t.config) == {f.name for f in fields(TrialConfig)}
        cfg = TrialConfig.from_dict(t.config)
        assert cfg.backbone in ("tf_efficientnet_lite0", "resnet18", "mobilenetv2_100")
        assert 32 <= cfg.input_size <= 64 and cfg.total_epochs <= 4


def test_trials_report_every_epoch(e2e_search):
    for t in load_trials(e2e_search[0]):
        epochs = [r["epoch"] for r in t.results]
        assert epochs == list(range(1, len(epochs) + 1))
        for r in t.results:
            assert {"val_acc", "val_loss", "train_loss", "stage", "lr", "images_per_sec"} <= set(r)
            assert r["images_per_sec"] > 0


def test_best_config_round_trips(e2e_search):
    exp = e2e_search[0]
    best = yaml.safe_load((exp / "best_config.yaml").read_text())
    assert best == json.loads((exp / "best_config.json").read_text())
    trials = {t.trial_id: t for t in load_trials(exp)}
    winner = trials[best["trial_id"]]
    assert best["config"] == winner.config
    assert TrialConfig.from_dict(best["config"]).to_dict() == winner.config
    assert best["best_val_acc"] == max(t.best["val_acc"] for t in trials.values() if t.best)
    assert "analyze.py" in best["retrain_command"]


def test_analyze_retrains_and_tests_above_chance(e2e_analyzed):
    exp = e2e_analyzed[0]
    metrics = json.loads((exp / "analysis" / "test_metrics.json").read_text())
    assert set(metrics) >= {"test_acc", "test_top5", "test_coarse_acc", "test_loss", "epochs", "train_seconds"}
    assert metrics["test_acc"] > 3 * 0.01  # chance is 1 %
    ckpt = torch.load(exp / "analysis" / "model.pt", weights_only=True)
    assert ckpt["config"]["backbone"] and len(ckpt["fine_names"]) == 100
    # the console names the images the retrain trained on: train+val, a patience that read val replayed
    out = e2e_analyzed[1].stdout
    assert f"retraining on {metrics['train_images']} train+val images" in out, out[-2000:]
    assert ("decisions replayed" in out) == TrialConfig.from_dict(ckpt["config"]).uses_val, out[-2000:]
    assert (metrics["replayed"] is not None) == TrialConfig.from_dict(ckpt["config"]).uses_val


def test_each_trial_keeps_its_last_and_best_checkpoint(e2e_search):
    for t in load_trials(e2e_search[0]):
        kept = sorted(int(p.name.split("_")[1]) + 1 for p in t.path.glob("checkpoint_*"))  # -> epoch
        acc = {int(r["epoch"]): r["val_acc"] for r in t.results}
        best_epochs = {e for e, a in acc.items() if a == t.best["val_acc"]}  # ties: Tune may keep either
        assert t.epochs_run in kept and len(kept) <= 2, (t.trial_id, kept)
        assert set(kept) & best_epochs and set(kept) <= best_epochs | {t.epochs_run}, (t.trial_id, kept, acc)


BASELINES = ("alexnet_scratch", "efficientnetv2s_coarse_fine")


def test_analyze_compares_the_search_best_with_recipes(e2e_analyzed, weights_args, tmp_path):
    exp = shutil.copytree(e2e_analyzed[0], tmp_path / "e2e")  # its baselines would change the report others read
    out = exp / "analysis"
    best = json.loads((out / "test_metrics.json").read_text())
    pretrained = "--weights-dir" in weights_args  # the search's weights folder serves the recipes too
    proc = run_cli("analyze.py", exp, "--no-retrain", "--baselines", ",".join(BASELINES), "--epochs-scale", 0.05,
                   "--set", "efficientnetv2s_coarse_fine:backbone=tf_efficientnet_lite0",
                   "--set", "efficientnetv2s_coarse_fine:input_size=64",
                   *([] if pretrained else ["--set", "pretrained=false"]), check=True)
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [r["recipe"] for r in rows][1:] == list(BASELINES) and rows[0]["recipe"].startswith("search best")
    assert rows[0]["test_acc"] == best["test_acc"]  # the best's earlier retrain, not a second test
    alex, cf = rows[1], rows[2]
    assert (alex["planned_epochs"], alex["input_size"], alex["pretrained"]) == (2, 32, False)  # 50 x 0.05
    assert 1 <= alex["epochs"] <= 2 and alex["train_images"] < best["train_images"]  # val held out: early stopping
    assert (cf["backbone"], cf["input_size"], cf["planned_epochs"]) == ("tf_efficientnet_lite0", 64, 1)
    assert cf["train_images"] == best["train_images"] and cf["head"] == "coarse_to_fine"
    cf_metrics = json.loads((out / "baselines" / "efficientnetv2s_coarse_fine" / "test_metrics.json").read_text())
    assert 0 <= cf_metrics["test_coarse_head_acc"] <= 1 and cf_metrics["test_coarse_acc"] == cf["test_coarse_acc"]
    if pretrained:
        assert cf["test_acc"] > 3 * 0.01  # one epoch from ImageNet weights beats chance (1 %)
    for r in rows:
        assert not r["error"] and 0 <= r["test_acc"] <= 1 and r["train_seconds"] > 0
    assert "test coarse acc" in proc.stdout and "search best (trial" in proc.stdout
    report = (out / "report.html").read_text()
    assert "Search best vs hand-made recipes" in report and "efficientnetv2s_coarse_fine" in report


@pytest.mark.parametrize("args, fragment", [
    (["--baselines", "tiny"], "choose recipes from"),
    (["--baselines", "alexnet_scratch", "--set", "lr=1"], "unknown hyper-parameter"),
    (["--baselines", "alexnet_scratch", "--epochs-scale", "0"], "--epochs-scale 0.0 must be"),
    (["--set", "pretrained=false"], "add --baselines"),
    (["--baselines", "mobilenetv2_2phase_96", "--weights-dir", "/nonexistent"], "no weights file"),
])
def test_analyze_bad_baseline_input_is_one_line_and_keeps_results(e2e_search, args, fragment, capsys):
    """In this process (a traceback fails the test); the first case as a process, for its exit code
    and a stderr holding only the message."""
    exp = e2e_search[0]
    written = {p: p.read_bytes() for p in (exp / "analysis").glob("*.json")}
    if args == ["--baselines", "tiny"]:
        proc = run_cli("analyze.py", exp, "--no-retrain", *args, timeout=120)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code = analyze.main([str(exp), "--no-retrain", *args])
        out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert out == ""  # checked before any output: no leaderboard above the error
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert {p: p.read_bytes() for p in written} == written
