"""The frozen-feature cache: a head-only stage on cached features trains as the uncached one does
(losses, accuracies), which stages qualify, the memory refusal, eviction, and the CLI paths that
use it (search trials, the final retrain, --baselines)."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from analysis.experiment import load_trials
from tests.conftest import WEIGHTS, run_cli
from tests.fake_cifar import write_fake_cifar
from trainable import features
from trainable.config import TrialConfig
from trainable.data import prepare_search_data
from trainable.errors import UserError
from trainable.model import create_model, set_trainable
from trainable.stages import plan_stages
from trainable.trial import run_trial

LITE0 = (WEIGHTS / "tf_efficientnet_lite0.pth").is_file()
# pretrained lite0 when the offline weights are here (the real case), else a random-init resnet18
MODEL = ({"backbone": "tf_efficientnet_lite0", "weights_dir": str(WEIGHTS)} if LITE0
         else {"backbone": "resnet18", "pretrained": False})
HEAD_ONLY = {**MODEL, "input_size": 48, "batch_size": 50, "aug_strength": 0.0, "stage1_epochs": 2,
             "stage1_lr": 3e-3, "stage2_epochs": 1, "stage2_lr": 1e-3, "eval_batch_size": 64}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_fake_cifar(tmp_path_factory.mktemp("fake"), train_per_class=4, test_per_class=1)
    return prepare_search_data(root, subset=None, val_fraction=0.25, seed=0, download=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_TUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "features"


def _run(config: dict, data, monkeypatch, switch: str) -> list[dict]:
    monkeypatch.setenv(features.SWITCH_ENV, switch)
    rows: list[dict] = []
    run_trial(config, data.train, data.val, lambda m, _c: rows.append(m), checkpoint=False)
    return rows


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("extra", [{"head": "coarse_to_fine", "label_smoothing": 0.2, "optimizer": "adamw"},
                                   {"augment": "none", "schedule": "onecycle", "stage2_epochs": 0}])
def test_cached_head_trains_as_the_uncached_one(extra, data, cache, monkeypatch):
    cfg = {**HEAD_ONLY, **extra}
    plain = _run(cfg, data, monkeypatch, "off")
    built = _run(cfg, data, monkeypatch, "on")
    hit = _run(cfg, data, monkeypatch, "on")
    stage2 = ["off"] * cfg["stage2_epochs"]  # stage 2 trains blocks: uncached, from the same head
    assert [r["feature_cache"] for r in plain] == ["off", "off"] + stage2
    assert [r["feature_cache"] for r in built] == ["built", "hit"] + stage2
    assert [r["feature_cache"] for r in hit] == ["hit", "hit"] + stage2
    assert len(list(cache.glob("*.pt"))) == (2 if extra.get("augment") == "none" else 3)  # train (+ mirror), val
    for rows in (built, hit):
        for a, b in zip(plain, rows):
            for k in ("train_loss", "val_loss", "val_top5", "lr") + (("val_coarse_head_loss",) if "head" in extra else ()):
                assert b[k] == pytest.approx(a[k], rel=2e-4, abs=1e-5), (k, a["epoch"])
            assert abs(b["val_acc"] - a["val_acc"]) <= 1 / len(data.val) + 1e-9  # one image's argmax tie at most
    assert hit[0]["feature_seconds"] < built[0]["feature_seconds"]


@pytest.mark.parametrize("change, reason", [
    ({"aug_strength": 0.5}, "beyond a horizontal flip"),
    ({"augment": "flip,rotate=10"}, "beyond a horizontal flip"),
    ({"augment": "jitter"}, "beyond a horizontal flip"),
    ({"mixup_alpha": 0.2}, "mixup/cutmix"),
    ({"cutmix_alpha": 1.0}, "mixup/cutmix"),
    ({"augment": "flip"}, None),
    ({"augment": "none"}, None),
    ({"augment": "flip,zoom=0,erase=0"}, None),  # ops named at 0 are off
])
def test_which_stage_one_configs_are_cacheable(change, reason):
    cfg = TrialConfig.from_dict({**HEAD_ONLY, **change})
    s1, s2 = plan_stages(cfg)
    got = features.why_not_cached(cfg, s1)
    assert (got is None) if reason is None else (reason in got)
    assert "backbone blocks" in features.why_not_cached(cfg, s2)


@pytest.mark.parametrize("spoil, reason", [
    (lambda net: setattr(net.backbone, "drop_rate", 0.2), "drops out its pooled features"),
    (lambda net: net.backbone.layer4.append(nn.Dropout(0.1)), "drops out at random"),
    (lambda net: net.backbone.layer4.append(nn.BatchNorm2d(512, affine=False)), "updates its running statistics"),
])
def test_a_backbone_with_randomness_or_moving_statistics_is_not_cached(spoil, reason):
    net = create_model("resnet18", pretrained=False)
    assert "backbone parameters train" in features._why_not_model(net, freeze_bn=False)  # every block, as built
    set_trainable(net, 0)  # stage 1's freezing
    assert features._why_not_model(net, freeze_bn=False) is None
    spoil(net)
    assert reason in features._why_not_model(net, freeze_bn=False)


@pytest.mark.usefixtures("one_thread")
def test_over_its_memory_budget_the_stage_runs_uncached_and_says_so_once(data, cache, monkeypatch, capsys):
    monkeypatch.setattr(features, "trial_budget", lambda cpus: 1000)  # bytes: far below any feature set
    rows = _run({**HEAD_ONLY, "stage1_epochs": 2, "stage2_epochs": 0}, data, monkeypatch, "on")
    assert [r["feature_cache"] for r in rows] == ["off", "off"]
    out = capsys.readouterr().out
    assert out.count("feature cache: off for stage 1") == 1 and "over the budget of" in out
    assert not list(cache.glob("*.pt"))


def test_bad_switch_value_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(features.SWITCH_ENV, "maybe")
    with pytest.raises(UserError, match="use on or off"):
        features.enabled()


def test_eviction_keeps_the_most_recently_used_within_the_cap(tmp_path):
    for i, name in enumerate(["old", "mid", "new"]):
        (tmp_path / f"{name}.pt").write_bytes(b"x" * 100)
        os.utime(tmp_path / f"{name}.pt", (1000 + i, 1000 + i))
    gone = features.evict(tmp_path, 250)
    assert [p.name for p in gone] == ["old.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["mid.pt", "new.pt"]


def test_weights_and_images_digests_change_with_their_content():
    a, b = create_model("resnet18", pretrained=False), create_model("resnet18", pretrained=False)
    b.load_state_dict(a.state_dict())
    assert features.weights_digest(a.backbone) == features.weights_digest(b.backbone)
    with torch.no_grad():
        next(b.backbone.parameters()).add_(1e-3)
    assert features.weights_digest(a.backbone) != features.weights_digest(b.backbone)
    import numpy as np
    x = np.zeros((4, 3, 32, 32), np.uint8)
    y = x.copy()
    y[3, 2, 31, 31] = 1
    assert features.images_digest(x) == features.images_digest(x.copy()) != features.images_digest(y)


@pytest.mark.skipif(not LITE0, reason="needs the offline lite0 weights")
def test_search_trials_share_the_cache(tmp_path, data_dir):
    """Two search trials (their own Ray workers) with the same backbone and size: the first
    extracts the features, the second reads them, and their rows say so."""
    env = {"CIFAR_TUNE_CACHE": str(tmp_path / "cache")}
    sets = ["--set", "stage3_epochs=0", "--set", "stage1_epochs=2", "--set", "stage2_epochs=0", "--set", "aug_strength=0",
            "--set", "mixup_alpha=0", "--set", "cutmix_alpha=0", "--set", "input_size=32", "--set", "batch_size=64"]
    run_cli("run_search.py", "--space", "tiny", "--backbones", "tf_efficientnet_lite0", "--weights-dir", WEIGHTS,
            "--num-samples", 2, "--max-concurrent", 1, "--cpus-per-trial", 1, "--scheduler", "fifo", "--max-epochs", 2,
            "--warm-start", "none", "--subset", 5, "--data-dir", data_dir, "--storage-path", tmp_path / "runs",
            "--name", "fc", "--seed", 0, *sets, env=env, check=True)
    # in either order of listing (Ray's timestamps are whole seconds): one trial built the cache, every other epoch read it
    rows = sorted([r["feature_cache"] for r in t.results] for t in load_trials(tmp_path / "runs" / "fc"))
    assert rows == [["built", "hit"], ["hit", "hit"]]
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 3  # train, its mirror, val


@pytest.mark.usefixtures("one_thread")
def test_final_retrain_and_baselines_use_the_cache(tmp_path, cache, capsys):
    """analyze.py's retrain (train+val, no validation) and a --baselines recipe (efficientnetv2_frozen:
    it watches the search's val split) train their head-only stage on cached features."""
    from analysis.baselines import baseline_configs, run_baseline
    from analysis.final import retrain_and_test
    from trainable.data import prepare_final_data
    root = write_fake_cifar(tmp_path / "fake", train_per_class=3, test_per_class=1)
    data = prepare_final_data(root, subset=None, seed=0, val_fraction=0.25, download=False)
    best = {**HEAD_ONLY, "input_size": 32, "stage1_epochs": 2, "stage2_epochs": 0}
    metrics = retrain_and_test(best, data, tmp_path / "final")
    assert metrics["epochs"] == 2 and not metrics["watched_val"]
    out = capsys.readouterr().out
    assert "feature cache: stage 1 trains the head on the frozen backbone's features, extracted" in out
    overrides = [f"{k}={v}" for k, v in MODEL.items()] + ["input_size=32"]
    (cfg,) = baseline_configs(["efficientnetv2_frozen"], overrides, {}, 0.07).values()
    got = run_baseline(cfg, data, tmp_path / "baseline")["metrics"]
    assert not got.get("error") and got["watched_val"] and got["epochs"] >= 1
    assert "feature cache: stage 1 trains the head on the frozen backbone's features" in capsys.readouterr().out
    assert len(list(cache.glob("*.pt"))) == 2 + 3  # train+val and its mirror; the search's train, mirror, val


def test_the_estimate_costs_a_cached_head_only_epoch_as_the_head_alone(monkeypatch):
    from planning.estimate import epoch_seconds
    speeds = {"tf_efficientnet_lite0@224": {"frozen": 0.05, "train": 0.2, "eval": 0.04, "head": 1e-5}}
    cfg = TrialConfig.from_dict({"input_size": 224, "stage1_epochs": 3, "stage2_epochs": 1,
                                 "aug_strength": 0.0})
    extract = (900 * 2 + 100) * 0.04  # every image and its mirror, then the validation images
    head = 1000 * 1e-5
    assert epoch_seconds(cfg, speeds, 900, 100) == pytest.approx([extract, head, head, 900 * 0.2 + 100 * 0.04])
    uncached = [900 * 0.05 + 100 * 0.04] * 3 + [900 * 0.2 + 100 * 0.04]
    assert epoch_seconds(TrialConfig.from_dict({**cfg.to_dict(), "aug_strength": 0.3}), speeds, 900, 100) \
        == pytest.approx(uncached)
    one = TrialConfig.from_dict({**cfg.to_dict(), "stage1_epochs": 1})  # builds no features (for_stage)
    assert epoch_seconds(one, speeds, 900, 100) == pytest.approx(uncached[2:])
    monkeypatch.setenv(features.SWITCH_ENV, "off")
    assert epoch_seconds(cfg, speeds, 900, 100) == pytest.approx(uncached)


@pytest.mark.usefixtures("one_thread")
def test_an_unwritable_cache_folder_runs_the_stage_uncached_and_says_so(data, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("CIFAR_TUNE_CACHE", str(tmp_path / "a_file"))  # no folder can be made under a file
    rows = _run({**HEAD_ONLY, "input_size": 32, "stage1_epochs": 1, "stage2_epochs": 0}, data, monkeypatch, "on")
    assert [r["feature_cache"] for r in rows] == ["off"] and rows[0]["status"] == "ok"
    assert "cannot be written (set CIFAR_TUNE_CACHE" in capsys.readouterr().out


@pytest.mark.usefixtures("one_thread")
def test_a_one_epoch_stage_reads_cached_features_but_builds_none(data, cache, monkeypatch):
    """Extracting an image and its mirror costs about two uncached epochs: not worth it for one."""
    one = {**HEAD_ONLY, "input_size": 32, "stage1_epochs": 1, "stage2_epochs": 0}
    assert [r["feature_cache"] for r in _run(one, data, monkeypatch, "on")] == ["off"]
    assert not list(cache.glob("*.pt"))
    assert [r["feature_cache"] for r in _run({**one, "stage1_epochs": 2}, data, monkeypatch, "on")] == ["built", "hit"]
    assert [r["feature_cache"] for r in _run(one, data, monkeypatch, "on")] == ["hit"]


@pytest.mark.usefixtures("one_thread")
def test_a_trial_resumed_inside_a_cached_stage_continues_as_the_uninterrupted_one(data, cache, tmp_path,
                                                                                  monkeypatch):
    import shutil
    cfg = {**HEAD_ONLY, "input_size": 32, "stage1_epochs": 3, "stage2_epochs": 0}
    whole = _run(cfg, data, monkeypatch, "on")
    saved = tmp_path / "ckpt"

    def keep(m, ckpt):
        if m["epoch"] == 1:
            shutil.copytree(ckpt, saved)
    run_trial(cfg, data.train, data.val, keep, stop_after_epoch=1)
    rows: list[dict] = []
    run_trial(cfg, data.train, data.val, lambda m, _c: rows.append(m), restore=saved)
    assert [r["epoch"] for r in rows] == [2, 3] and [r["feature_cache"] for r in rows] == ["hit", "hit"]
    for a, b in zip(whole[1:], rows):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5) and b["val_acc"] == a["val_acc"]
