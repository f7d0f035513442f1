"""run_trial's per-trial callbacks and heads: early stopping and reduce-on-plateau on val_loss,
resuming them from a checkpoint, the coarse-to-fine head's metrics, and a from-scratch recipe."""
from __future__ import annotations

import shutil

import pytest
import torch

from analysis.outcome import early_stopped
from spaces import recipe_config, scale_epochs
from tests.fake_cifar import write_fake_cifar
from trainable import trial
from trainable.data import prepare_search_data
from trainable.loop import evaluate_outputs
from trainable.trial import run_trial

pytestmark = pytest.mark.usefixtures("one_thread")

_EVALUATE = trial.evaluate
BASE = {"backbone": "resnet18", "pretrained": False, "input_size": 32, "batch_size": 50,
        "aug_strength": 0.0, "eval_batch_size": 200}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_fake_cifar(tmp_path_factory.mktemp("fake"), train_per_class=4, test_per_class=1)
    return prepare_search_data(root, subset=None, val_fraction=0.25, seed=0, download=False)



def _script_val_loss(monkeypatch, losses: list[float]) -> None:
    """Real evaluation, but val_loss follows `losses`: the callbacks see a known curve."""
    it = iter(losses)
    monkeypatch.setenv("CIFAR_TUNE_FEATURE_CACHE", "off")  # a cached head-only stage does not call evaluate

    def scripted(*a, **k):
        return {**_EVALUATE(*a, **k), "loss": next(it)}
    monkeypatch.setattr(trial, "evaluate", scripted)


def _run(config: dict, data, **kw) -> list[dict]:
    rows: list[dict] = []
    run_trial({**BASE, **config}, data.train, data.val, lambda m, _c: rows.append(m), checkpoint=False, **kw)
    return rows


# --- early stopping -------------------------------------------------------------------------------

def test_early_stopping_ends_each_stage_then_the_trial(monkeypatch, data):
    cfg = {"stage1_epochs": 5, "stage2_epochs": 5, "early_stop_patience": 2}
    # stage 1: a low at epoch 2, then two epochs without one -> ends after epoch 4 (of 5)
    # stage 2: a fresh count; a low at its epoch 1, two worse -> ends after epoch 3 (of 5)
    _script_val_loss(monkeypatch, [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.9, 0.1])
    rows = _run(cfg, data)
    assert [r["epoch"] for r in rows] == list(range(1, 8))
    assert [r["stage"] for r in rows] == [1, 1, 1, 1, 2, 2, 2]
    assert [r["early_stopped"] for r in rows] == [False, False, False, True, False, False, True]
    assert early_stopped({**BASE, **cfg}, rows[-1])
    assert not early_stopped({**BASE, **cfg}, rows[3])  # stage 1 ending early is not the trial's end


def test_a_stage_that_runs_its_course_is_not_early_stopped(monkeypatch, data):
    _script_val_loss(monkeypatch, [1.0, 1.1, 1.2])  # 2 bad epochs, but the last is the stage's last
    rows = _run({"stage1_epochs": 1, "stage2_epochs": 2, "early_stop_patience": 2}, data)
    assert [r["early_stopped"] for r in rows] == [False, False, False]


def test_without_patience_nothing_stops(monkeypatch, data):
    _script_val_loss(monkeypatch, [1.0, 2.0, 3.0, 4.0])
    rows = _run({"stage1_epochs": 2, "stage2_epochs": 2}, data)
    assert len(rows) == 4 and not any(r["early_stopped"] for r in rows)


# --- reduce-on-plateau ------------------------------------------------------------------------------

def test_plateau_cuts_the_lr_after_patience_epochs(monkeypatch, data):
    cfg = {"stage1_epochs": 6, "stage2_epochs": 0, "stage1_lr": 1e-2, "schedule": "constant",
           "warmup_frac": 0.0, "plateau_patience": 2, "plateau_factor": 0.1}
    _script_val_loss(monkeypatch, [1.0, 1.1, 1.2, 1.3, 1.4, 0.5])
    lrs = [r["lr"] for r in _run(cfg, data)]  # the lr each epoch trained with
    # cut after epoch 3 (epochs 2, 3 without a new low), again after epoch 5 (4, 5)
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-2, 1e-3, 1e-3, 1e-4])


def test_constant_schedule_warms_up_then_stays_flat(data):
    cfg = {"stage1_epochs": 3, "stage2_epochs": 0, "stage1_lr": 1e-2, "schedule": "constant",
           "warmup_frac": 0.5}
    lrs = [r["lr"] for r in _run(cfg, data)]  # 3 epochs x 6 steps; warmup 9 steps
    assert lrs[0] < 1e-2 and lrs[1:] == pytest.approx([1e-2, 1e-2])


# --- resuming keeps the callbacks' state ----------------------------------------------------------

def test_resume_mid_stage_continues_the_patience_count(monkeypatch, data, tmp_path):
    cfg = {**BASE, "stage1_epochs": 6, "stage2_epochs": 1, "early_stop_patience": 3,
           "schedule": "constant", "warmup_frac": 0.0, "plateau_patience": 2, "plateau_factor": 0.5}
    losses = [1.0, 1.1, 1.2, 1.3, 0.2, 0.1]  # stage 1 stops after epoch 4 (3 bad epochs)
    saved = tmp_path / "after_epoch_2"

    def keep_epoch_2(m, ckpt):
        if m["epoch"] == 2:
            shutil.copytree(ckpt, saved)
        rows.append(m)
    rows: list[dict] = []
    _script_val_loss(monkeypatch, losses)
    run_trial(cfg, data.train, data.val, keep_epoch_2)
    resumed: list[dict] = []
    _script_val_loss(monkeypatch, losses[2:])
    run_trial(cfg, data.train, data.val, lambda m, _c: resumed.append(m), restore=saved)
    key = lambda rs: [(r["epoch"], r["stage"], r["early_stopped"], r["lr"]) for r in rs]  # noqa: E731
    assert key(resumed) == key(rows[2:])
    assert [r["epoch"] for r in resumed] == [3, 4, 5] and resumed[1]["early_stopped"]


def test_a_non_finite_loss_ends_the_trial_at_once_with_status_diverged(monkeypatch, data):
    real = trial.fit_epoch

    def nan_in_epoch_2(t, *a, **k):  # faults come in through a function of the loop, not a hook in it
        out = real(t, *a, **k)
        return {**out, "train_loss": float("nan")} if t.at.epoch == 2 else out
    monkeypatch.setattr(trial, "fit_epoch", nan_in_epoch_2)
    rows, ckpts = [], []
    _, last = run_trial({**BASE, "stage1_epochs": 1, "stage2_epochs": 2}, data.train, data.val,
                        lambda m, c: (rows.append(m), ckpts.append(c)))
    assert [r["status"] for r in rows] == ["ok", "diverged"] and ckpts[0] is not None and ckpts[1] is None
    assert last == rows[-1] and last["val_acc"] == last["best_val_acc"] == 0.0  # never a candidate for best
    assert last["error"] == "non-finite training loss in epoch 2" and "diverged" not in last


def test_a_config_that_trains_on_val_loss_needs_val_or_a_replay(data):
    with pytest.raises(ValueError, match="validation split or a replay"):
        run_trial({**BASE, "early_stop_patience": 2}, data.train, None, lambda m, c: None)


def test_a_retrain_without_val_replays_the_search_trials_plateau_cuts_and_early_stops(monkeypatch, data):
    """The retrain on train + val has no val to watch: it cuts the lr and ends stages where the search trial did."""
    cfg = {"stage1_epochs": 5, "stage2_epochs": 3, "stage1_lr": 1e-2, "stage2_lr": 1e-3, "schedule": "constant",
           "warmup_frac": 0.0, "plateau_patience": 1, "plateau_factor": 0.5, "early_stop_patience": 2}
    # stage 1: cut after epoch 2, again after 3, ends early after 3; stage 2 (epochs 4-6): a cut after 5, runs out
    _script_val_loss(monkeypatch, [1.0, 1.1, 1.2, 0.9, 1.0, 0.8])
    searched = _run(cfg, data)
    assert [r["lr_cut"] for r in searched] == [False, True, True, False, True, False]
    assert [r["early_stopped"] for r in searched] == [False, False, True, False, False, False]
    replay = trial.Replay.of(searched)
    assert (replay.lr_cuts, replay.early_stops) == ({2, 3, 5}, {3})
    retrained: list[dict] = []
    run_trial({**BASE, **cfg}, data.train, None, lambda m, _c: retrained.append(m), checkpoint=False, replay=replay)
    key = lambda rs: [(r["epoch"], r["stage"], r["early_stopped"], r["lr"]) for r in rs]  # noqa: E731
    assert key(retrained) == key(searched)
    assert [r["lr"] for r in retrained] == pytest.approx([1e-2, 1e-2, 5e-3, 1e-3, 1e-3, 5e-4])


# --- heads and from-scratch training --------------------------------------------------------------

def test_coarse_to_fine_head_reports_both_heads_and_learns_superclasses(data):
    rows = _run({"head": "coarse_to_fine", "stage1_epochs": 1, "stage2_epochs": 1,
                 "stage3_epochs": 4, "stage1_lr": 0.05, "stage2_lr": 0.05, "stage3_lr": 0.05,
                 "layer_decay": 1.0}, data)
    for r in rows:
        assert {"val_acc", "val_coarse_acc", "val_coarse_head_acc", "val_coarse_head_loss"} <= set(r)
    assert max(r["val_coarse_head_acc"] for r in rows) > 2 * (1 / 20)  # twice chance
    assert rows[-1]["val_coarse_head_loss"] < rows[0]["val_coarse_head_loss"]
    flat = _run({"stage1_epochs": 1, "stage2_epochs": 1}, data)
    assert "val_coarse_head_acc" not in flat[-1] and "val_coarse_acc" in flat[-1]


@pytest.mark.parametrize("recipe", ["alexnet_scratch", "vgg13_scratch"])  # resnet18: the test below
def test_scratch_recipe_trains_every_parameter(recipe, data):
    cfg = scale_epochs(recipe_config(recipe), 0.04)  # 50 -> 2 epochs, patiences 10/5 -> 1/1
    assert (cfg["stage3_epochs"], cfg["early_stop_patience"], cfg["plateau_patience"]) == (2, 1, 1)
    assert not cfg["pretrained"] and cfg["small_input_stem"] and cfg["input_size"] == 32
    net, last = run_trial({**cfg, "early_stop_patience": 0}, data.train, data.val, lambda m, c: None,
                          checkpoint=False)
    assert last["stage"] == 3 and last["trainable_params"] == sum(p.numel() for p in net.parameters())
    assert last["status"] == "ok" and last["val_loss"] < 10


def test_resnet18_from_scratch_learns(data):
    cfg = {**scale_epochs(recipe_config("resnet18_scratch"), 0.06), "early_stop_patience": 0, "batch_size": 50}
    _, last = run_trial(cfg, data.train, data.val, lambda m, c: None, checkpoint=False)
    assert last["best_val_acc"] > 3 * 0.01  # chance is 1 %


def test_the_calibrated_loss_ranks_what_a_model_predicts_apart_from_its_confidence():
    """The fine-tuning duel's screen (BENCHMARKS.md, 2026-12-07): a recipe with label smoothing and mixup, near-uniform
    outputs, had the lowest val_loss (about ln 100) and was promoted over one whose confident scores held more."""

    gen = torch.Generator().manual_seed(0)
    n, c = 400, 100
    fine = torch.arange(n) % c
    coarse = fine // 5
    signal = torch.randn(n, c, generator=gen)
    signal[torch.arange(n), fine] += 1.0  # the true class scores higher, as a trained head's would: 6.5 % top-1
    sharp = 3.0 * signal  # confident: informative, but overconfident where wrong
    flat = 0.02 * torch.randn(n, c, generator=gen)  # near-uniform: learned next to nothing
    flat[torch.arange(n), fine] += 0.005

    def metrics(logits):
        return evaluate_outputs(lambda rows: logits[rows], fine, coarse, batch_size=64)
    s, f = metrics(sharp), metrics(flat)
    assert s["loss"] > f["loss"] > 4.5  # the plain loss prefers the model that learned nothing ...
    assert s["cal_loss"] < f["cal_loss"]  # ... the calibrated one does not
    for m in (s, f):
        assert m["cal_loss"] <= m["loss"] + 1e-6  # temperature 1 is on the grid


def test_each_checkpoint_is_written_under_scratch_and_gone_after_its_report(data, tmp_path):
    # a search passes its experiment folder: a killed search's last checkpoints stay there, not in /tmp
    # (56 folders of 39 MB each had piled up in /tmp from killed test searches)
    seen: list = []
    run_trial({**BASE, "stage1_epochs": 1, "stage2_epochs": 1}, data.train, data.val,
              lambda m, c: seen.append((c.parent, sorted(p.name for p in c.iterdir()))), scratch=tmp_path)
    assert seen == [(tmp_path, [trial.CHECKPOINT_FILE])] * 2
    assert list(tmp_path.iterdir()) == []
