"""Retrain what was selected: the best trial's own trajectory (stage plan and lr schedule built for
the whole plan) cut after its best epoch, recorded in test_metrics.json and said in the report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import analyze
from analysis.experiment import SETTINGS_FILE, read_best_config
from analysis.final import retrain_and_test
from report.build import cut_sentence
from tests.conftest import run_cli
from tests.fake_cifar import write_fake_cifar
from trainable.config import TrialConfig
from trainable.data import prepare_final_data, prepare_search_data
from trainable.trial import run_trial

# 4 epochs: stage 1 (head) 1 epoch, stage 2 3 epochs of warmup + cosine
pytestmark = pytest.mark.usefixtures("one_thread")

CFG = {"backbone": "resnet18", "pretrained": False, "input_size": 32, "batch_size": 50, "aug_strength": 0.0,
       "eval_batch_size": 200, "stage1_epochs": 1, "stage2_epochs": 3, "schedule": "cosine",
       "warmup_frac": 0.1, "stage1_lr": 0.01, "stage2_lr": 0.01, "unfreeze_depth": 1}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_cifar(tmp_path_factory.mktemp("fake"), train_per_class=4, test_per_class=1)


@pytest.fixture(scope="module")
def data(data_root):
    return prepare_search_data(data_root, subset=None, val_fraction=0.25, seed=0, download=False)



def _rows(config: dict, data, **kw) -> list[dict]:
    rows: list[dict] = []
    run_trial(config, data.train, data.val, lambda m, _c: rows.append(m), checkpoint=False, **kw)
    return rows


@pytest.fixture(scope="module")
def full(data) -> list[dict]:
    return _rows(CFG, data)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_cut_run_is_the_full_runs_trajectory_up_to_epoch_k(data, full, k):
    cut = _rows(CFG, data, stop_after_epoch=k)
    assert [r["epoch"] for r in cut] == list(range(1, k + 1))
    assert len(full) == 4
    assert cut[-1]["lr"] == pytest.approx(full[k - 1]["lr"], rel=1e-9)  # the same schedule, cut
    assert cut[-1]["stage"] == full[k - 1]["stage"]
    assert cut[-1]["train_loss"] == pytest.approx(full[k - 1]["train_loss"], rel=1e-4)  # same weights path


def test_the_schedule_is_the_full_plans_not_a_shorter_plans(data, full):
    """Cutting at epoch 2 is not the same as planning 2 epochs: the cosine is built for all 4."""
    cut = _rows(CFG, data, stop_after_epoch=2)
    shorter = _rows({**CFG, "stage2_epochs": 1}, data)
    assert len(shorter) == 2
    assert cut[-1]["lr"] != pytest.approx(shorter[-1]["lr"], rel=1e-3)
    assert full[1]["lr"] > full[2]["lr"] > full[3]["lr"]  # still decaying after the cut point


def test_a_cut_at_or_past_the_plan_runs_the_plan(data, full):
    assert len(_rows(CFG, data, stop_after_epoch=9)) == 4


def test_a_cut_before_epoch_1_is_refused(data):
    with pytest.raises(ValueError, match="stop_after_epoch"):
        run_trial(CFG, data.train, data.val, lambda m, c: None, stop_after_epoch=0)


# --- the decision analyze.py makes ---------------------------------------------------------------

@pytest.mark.parametrize("best_epoch, full_schedule, expected", [
    (2, False, 2), (1, False, 1), (3, False, 3),
    (4, False, None),  # the best epoch is the last: nothing to cut
    (7, False, None),  # a config whose plan shrank under it: never longer than the plan
    (2, True, None), (None, False, None), (0, False, None),
])
def test_retrain_cut(best_epoch, full_schedule, expected):
    assert analyze.retrain_cut(best_epoch, CFG, full_schedule=full_schedule) == expected


def test_a_best_config_file_carries_its_cut_and_a_plain_config_none(tmp_path):
    best = tmp_path / "best_config.yaml"
    best.write_text(yaml.safe_dump({"trial_id": "t", "best_epoch": 2, "config": CFG}))
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(CFG))
    as_json = tmp_path / "best_config.json"
    as_json.write_text(json.dumps({"best_epoch": 3, "config": CFG}))
    assert read_best_config(best)[1] == 2 and read_best_config(as_json)[1] == 3
    assert read_best_config(plain)[1] is None


def test_retrain_and_test_records_the_cut(data_root, tmp_path):
    final = prepare_final_data(data_root, subset=None, seed=0, val_fraction=0.25, download=False)
    m = retrain_and_test(CFG, final, tmp_path / "cut", stop_after_epoch=2)
    saved = json.loads((tmp_path / "cut" / "test_metrics.json").read_text())
    assert saved == m
    assert (m["epochs"], m["planned_epochs"], m["cut_at_epoch"]) == (2, 4, 2)
    m = retrain_and_test(CFG, final, tmp_path / "whole", stop_after_epoch=4)
    assert (m["epochs"], m["planned_epochs"], m["cut_at_epoch"]) == (4, 4, None)


# --- through the CLI: analyze.py passes the best epoch, the report says why --------------------------

def _experiment(root: Path, data_root: Path, config: dict = CFG, accs=(0.05, 0.30, 0.20, 0.10),
                **per_epoch: list) -> Path:
    """A finished search of one trial whose val_acc peaked at epoch 2 (written as Tune does); `per_epoch`:
    more columns of its results, one value per epoch."""
    exp = root / "exp"
    trial_dir = exp / "trial_0"
    trial_dir.mkdir(parents=True)
    (trial_dir / "params.json").write_text(json.dumps(TrialConfig.from_dict(config).to_dict()))  # complete, as Tune's
    rows = [{"trial_id": "t0", "epoch": e, "stage": 1 if e == 1 else 2, "val_acc": a, "val_loss": 4.0,
             "best_val_acc": max(accs[:e]), "best_epoch": 2 if e >= 2 else 1, "lr": 0.01, "train_loss": 4.0,
             "images_per_sec": 100.0, "train_seconds": 1.0, "status": "ok", "training_iteration": e,
             **{k: v[e - 1] for k, v in per_epoch.items()}}
            for e, a in enumerate(accs, 1)]
    (trial_dir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (exp / SETTINGS_FILE).write_text(yaml.safe_dump({"data_dir": str(data_root), "subset": None, "seed": 0,
                                                     "val_fraction": 0.25, "space": "tiny"}))
    return exp


def test_analyze_retrains_up_to_the_best_epoch_and_the_report_says_so(tmp_path, data_root):
    exp = _experiment(tmp_path, data_root)
    proc = run_cli("analyze.py", exp, check=True)
    assert "retraining up to epoch 2 of 4" in proc.stdout
    m = json.loads((exp / "analysis" / "test_metrics.json").read_text())
    assert (m["epochs"], m["planned_epochs"], m["cut_at_epoch"]) == (2, 4, 2)
    page = (exp / "analysis" / "report.html").read_text()
    assert "The retrain was cut at epoch 2 of 4 because" in page

    # the exported retrain command (--config best_config.yaml) retrains the same cut
    run_cli("analyze.py", exp, "--config", exp / "best_config.yaml", check=True)
    assert json.loads((exp / "analysis" / "test_metrics.json").read_text())["cut_at_epoch"] == 2

    run_cli("analyze.py", exp, "--full-schedule", check=True)
    m = json.loads((exp / "analysis" / "test_metrics.json").read_text())
    assert (m["epochs"], m["cut_at_epoch"]) == (4, None)
    assert "cut at epoch" not in (exp / "analysis" / "report.html").read_text()


def test_the_report_sentence_names_the_cut_and_the_plan():
    s = cut_sentence({"cut_at_epoch": 7, "planned_epochs": 12})
    assert s.startswith("The retrain was cut at epoch 7 of 12 because") and "--full-schedule" in s
    assert s.count(".") <= 2 and s.endswith(".")  # one sentence


def test_a_config_whose_patience_read_val_retrains_on_train_and_val_replaying_its_decisions(tmp_path, data_root):
    """Its search trial cut the lr after epoch 2 and ended stage 2 early after epoch 3 (of 4)."""
    cfg = {**CFG, "schedule": "constant", "plateau_patience": 1, "plateau_factor": 0.5, "early_stop_patience": 1}
    exp = _experiment(tmp_path, data_root, cfg, accs=(0.05, 0.20, 0.30), lr_cut=[False, True, False],
                      early_stopped=[False, False, True])
    proc = run_cli("analyze.py", exp, "--full-schedule", check=True)
    final = prepare_final_data(data_root, subset=None, seed=0, val_fraction=0.25, download=False)
    assert f"retraining on {len(final.train_val)} train+val images" in proc.stdout, proc.stdout
    assert "trial t0's decisions replayed (lr cut after epoch(s) 2, a stage ended early after 3)" in proc.stdout
    m = json.loads((exp / "analysis" / "test_metrics.json").read_text())
    assert (m["epochs"], m["train_images"], m["watched_val"]) == (3, len(final.train_val), False)
    assert m["replayed"] == {"lr_cuts": [2], "early_stops": [3]}
    assert "decisions replayed: lr cut after epoch(s) 2" in (exp / "analysis" / "report.html").read_text()
    # a config no trial ran has no decisions to replay: it watches the search's val split, as before
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**cfg, "stage1_lr": 0.02}))
    proc = run_cli("analyze.py", exp, "--config", tmp_path / "other.yaml", check=True)
    assert f"retraining on the {len(final.search_split()[0])} train images" in proc.stdout, proc.stdout
    assert json.loads((exp / "analysis" / "test_metrics.json").read_text())["watched_val"]

