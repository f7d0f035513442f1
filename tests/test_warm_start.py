"""Issue 10: warm start from the recipes (and earlier experiments), stage-aware rungs, the time
budget and the cost estimate. Pure logic here; the CLI path is in tests/test_search_budget.py."""
from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import optuna
import pytest

from analysis.study import WARM_CONFIG, study_url
from planning.estimate import asha_rungs, epoch_seconds, reach
from planning.settings import parse_duration
from search.budget import BudgetStopper, spent
from planning.define import told_trials
from search.searcher import make_searcher, stage_aware_grace
from spaces import RECIPES, Options, Suggest, get_space, recipe_config
from spaces.warm_start import OutsideSpace, as_point, fit_epochs, recipe_points
from trainable.config import TrialConfig
from trainable.errors import UserError

optuna.logging.set_verbosity(optuna.logging.WARNING)
BASE = {"pretrained": True, "weights_dir": "", "seed": 0, "compile": False}
CPU = get_space("cpu")
LITES = CPU.backbones


# ------------------------------------------------------------------ fitting recipes into a budget

@pytest.mark.parametrize("budget", [1, 2, 3, 4, 7, 30])
@pytest.mark.parametrize("recipe", RECIPES)
def test_fit_epochs_fills_the_budget_exactly(recipe, budget):
    cfg = recipe_config(recipe, base=BASE)
    stages = [k for k in ("stage1_epochs", "stage2_epochs", "stage3_epochs") if cfg[k] > 0]
    if budget < len(stages):
        with pytest.raises(ValueError):
            fit_epochs(cfg, budget)
        return
    out = TrialConfig.from_dict(fit_epochs(cfg, budget))
    assert out.total_epochs == budget
    assert all(getattr(out, k) >= 1 for k in stages)  # no stage of the recipe disappears
    assert [k for k in ("stage1_epochs", "stage2_epochs", "stage3_epochs") if getattr(out, k) > 0] == stages
    for k in ("early_stop_patience", "plateau_patience"):
        assert (getattr(out, k) > 0) == (cfg[k] > 0)


def test_fit_epochs_is_proportional():
    cfg = recipe_config("resnet50_3stage_224", base=BASE)  # 10 / 10 / 20
    out = fit_epochs(cfg, 8)
    assert (out["stage1_epochs"], out["stage2_epochs"], out["stage3_epochs"]) == (2, 2, 4)
    assert out["early_stop_patience"] == 2  # 10 of 40 epochs -> 2 of 8


# ------------------------------------------------------------------ recipes as points of the space

def test_every_pretrained_recipe_is_a_point_of_the_cpu_space_on_every_backbone():
    points, skipped = recipe_points(CPU, Options(LITES, 4), BASE, {})
    pretrained = [r for r in RECIPES if recipe_config(r, base=BASE)["pretrained"]]
    assert not skipped
    assert sorted(p.name for p in points) == sorted(f"{r}@{b}" for r in pretrained for b in LITES)
    assert [p.config["backbone"] for p in points[:len(pretrained)]] == [LITES[0]] * len(pretrained)
    for p in points:
        cfg = TrialConfig.from_dict(p.config)
        assert cfg.total_epochs == 4 and cfg.pretrained
        recipe = p.name.split("@")[0]
        own = recipe_config(recipe, base=BASE)
        for k in ("optimizer", "schedule", "input_size", "batch_size", "augment", "head", "weight_decay"):
            assert p.config[k] == own[k], (p.name, k)  # the recipe's procedure, unchanged
        for k, dist in p.distributions.items():  # each told value lies inside its distribution
            internal = dist.to_internal_repr(p.params[k])
            assert dist._contains(internal), (p.name, k)


def test_recipes_on_their_own_backbone_when_the_space_allows_it():
    space = get_space("default")
    points, _ = recipe_points(space, Options(space.backbones, 30), BASE, {})
    names = {p.name for p in points}
    assert "resnet50_3stage_224@resnet50" in names and "bit_hyperrule@resnet50" in names
    assert "mobilenetv2_2stage_128@mobilenetv2_100" in names
    assert not any(n.startswith("resnet50_3stage_224@") and not n.endswith("@resnet50") for n in names)
    # efficientnetv2_frozen's network is not in the space: its procedure runs on every backbone
    assert {n for n in names if n.startswith("efficientnetv2_frozen@")} == \
        {f"efficientnetv2_frozen@{b}" for b in space.backbones}


def test_set_values_win_over_the_recipe_and_dedupe():
    points, _ = recipe_points(CPU, Options(LITES, 4), BASE, {"input_size": 64, "backbone": LITES[1]})
    assert points and all(p.config["input_size"] == 64 and p.config["backbone"] == LITES[1] for p in points)


def test_a_config_outside_the_space_is_refused():
    cfg = recipe_config("mobilenetv2_2stage_128", base=BASE)
    cfg = fit_epochs({**cfg, "backbone": LITES[0]}, 4)
    as_point("ok", cfg, CPU, Options(LITES, 4), {})
    with pytest.raises(OutsideSpace):
        as_point("x", {**cfg, "input_size": 100}, CPU, Options(LITES, 4), {})
    with pytest.raises(OutsideSpace):  # stage 2 does not get what the budget leaves
        as_point("x", {**cfg, "stage2_epochs": 2}, CPU, Options(LITES, 4), {})


# ------------------------------------------------------------------ the points reach Optuna

def _searcher(tmp_path: Path, sampler: str = "tpe", warm: bool = True):
    opts = Options(LITES, 4)
    points, _ = recipe_points(CPU, opts, BASE, {}) if warm else ([], [])
    return make_searcher(CPU, opts, {}, BASE, 0, tmp_path, points, [], sampler), points


def _score(cfg: dict) -> float:
    """A made-up objective: 224 px frozen feature extractors are best."""
    return 0.9 if cfg["input_size"] == 224 else 0.1 + 0.01 * random.random()


def _run(searcher, n: int) -> list[dict]:
    random.seed(0)
    out = []
    for i in range(n):
        cfg = searcher.suggest(f"t{i}")
        out.append(cfg)
        searcher.on_trial_complete(f"t{i}", {"best_val_acc": _score(cfg)})
    return out


def test_first_trials_are_exactly_the_recipe_points(tmp_path):
    searcher, points = _searcher(tmp_path)
    configs = _run(searcher, len(points) + 2)
    assert configs[:len(points)] == [p.config for p in points]
    assert configs[len(points)] not in [p.config for p in points]
    study = optuna.load_study(study_name="search", storage=study_url(tmp_path))
    told = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.user_attrs["warm_start"] for t in told[:len(points)]] == [p.name for p in points]
    assert all(t.user_attrs[WARM_CONFIG] == p.config for t, p in zip(told, points))
    assert (tmp_path / "optuna.db").is_file()


def test_tpe_learns_from_the_warm_start_results(tmp_path):
    """After the recipe trials, TPE proposes the size that scored best far more often than the
    1-in-5 a random search draws."""
    searcher, points = _searcher(tmp_path / "tpe")
    later = _run(searcher, len(points) + 20)[len(points):]
    rnd, _ = _searcher(tmp_path / "random", sampler="random")
    later_rnd = _run(rnd, len(points) + 20)[len(points):]
    share = sum(c["input_size"] == 224 for c in later) / len(later)
    share_rnd = sum(c["input_size"] == 224 for c in later_rnd) / len(later_rnd)
    assert share >= 0.5 and share > share_rnd + 0.2, (share, share_rnd)


def test_searcher_pickles_for_resume(tmp_path):
    searcher, points = _searcher(tmp_path)
    _run(searcher, 2)
    again = pickle.loads(pickle.dumps(searcher))
    assert again.suggest("t9") == points[2].config  # continues down the queue


# ------------------------------------------------------------------ earlier experiments (DIR)

def _fake_experiment(root: Path, configs: list[dict], values: list[float]) -> Path:
    for i, (c, v) in enumerate(zip(configs, values)):
        d = root / f"trial_{i:04d}"
        d.mkdir(parents=True)
        (d / "params.json").write_text(json.dumps(c))
        rows = [{"epoch": e, "val_acc": v * e / 4, "status": "ok", "trial_id": f"old{i}"} for e in (1, 2, 3, 4)]
        (d / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_earlier_experiments_are_told_before_the_first_trial(tmp_path):
    opts = Options(LITES, 4)
    points, _ = recipe_points(CPU, opts, BASE, {})
    old = _fake_experiment(tmp_path / "old", [p.config for p in points[:5]] + [{**points[0].config, "input_size": 100}],
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.9])
    frozen, skipped = told_trials([old], CPU, opts, {})
    assert len(frozen) == 5 and len(skipped) == 1 and "input_size=100" in skipped[0]
    searcher = make_searcher(CPU, opts, {}, BASE, 0, tmp_path / "new", [], frozen, "tpe")
    study = optuna.load_study(study_name="search", storage=study_url(tmp_path / "new"))
    assert sorted(t.value for t in study.trials) == [0.1, 0.2, 0.3, 0.4, 0.5]  # each trial's best epoch
    searcher.suggest("first")
    assert len(study.trials) == 6  # the new trial comes after the told ones


def test_a_bigger_epoch_budget_rescales_earlier_trials(tmp_path):
    points, _ = recipe_points(CPU, Options(LITES, 2), BASE, {})
    old = _fake_experiment(tmp_path / "old", [p.config for p in points[:3]], [0.5, 0.4, 0.3])
    frozen, skipped = told_trials([old], CPU, Options(LITES, 4), {})
    assert len(frozen) == 3 and not skipped


# ------------------------------------------------------------------ stage-aware rungs

@pytest.mark.parametrize("name, max_epochs", [("cpu", 4), ("cpu", 8), ("default", 30), ("tiny", 4)])
def test_no_trial_is_judged_before_its_blocks_trained(name, max_epochs):
    space = get_space(name)
    grace = stage_aware_grace(space, max_epochs)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    opts = Options(space.backbones, max_epochs)
    unfreezing = 0
    for _ in range(300):
        t = study.ask()
        cfg = TrialConfig.from_dict({**BASE, "pretrained": False, **space.sample(Suggest(t), opts)})
        study.tell(t, 0.0)
        if cfg.total_epochs > cfg.stage1_epochs:  # it unfreezes blocks at some point
            unfreezing += 1
            assert cfg.stage1_epochs + 1 <= grace, cfg
    assert unfreezing > 100
    assert grace > 1 or max_epochs == 1  # never the old decision at epoch 1, in stage 1


# ------------------------------------------------------------------ time budget

@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("2h", 7200), ("600s", 600), ("600", 600),
                                           ("1h30m", 5400), ("1.5h", 5400), (" 45 s ", 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "-5m", "0", "5m10", "m"])
def test_parse_duration_rejects(text):
    with pytest.raises(UserError, match="time-budget"):
        parse_duration(text)


def test_budget_stopper_counts_across_resume(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("search.budget.time.monotonic", lambda: now[0])
    stop = BudgetStopper(tmp_path, budget_s=100)
    now[0] += 60
    assert not stop.stop_all()
    assert spent(tmp_path) == pytest.approx(60)  # saved (every 5 s at most)
    now[0] = 5.0  # a resumed search: another process, another clock; it builds its stopper afresh
    restored = BudgetStopper(tmp_path, budget_s=100)
    now[0] += 30
    assert not restored.stop_all() and restored.left() == pytest.approx(10)
    now[0] += 11
    assert restored.stop_all() and spent(tmp_path) >= 100
    assert not restored("any-trial", {})


def test_the_budget_counts_from_the_commands_start(tmp_path, monkeypatch):
    """The checks, the estimate and Ray's start-up before the first trial are inside --time-budget."""
    now = [1000.0]
    monkeypatch.setattr("search.budget.time.monotonic", lambda: now[0])
    stop = BudgetStopper(tmp_path, budget_s=100, started=now[0] - 40)  # 40 s of set-up before the Tuner
    assert stop.left() == pytest.approx(60)
    now[0] += 60
    assert stop.stop_all() and spent(tmp_path) == pytest.approx(100)


# ------------------------------------------------------------------ cost estimate

def test_epoch_costs_follow_the_stage_plan():
    speeds = {"b@64": {"frozen": 0.01, "train": 0.03, "eval": 0.005}}
    cfg = TrialConfig.from_dict({"backbone": "b", "input_size": 64, "stage1_epochs": 1, "stage2_epochs": 2})
    assert epoch_seconds(cfg, speeds, n_train=100, n_val=20) == pytest.approx([1.1, 3.1, 3.1])


def test_asha_reach():
    assert asha_rungs(3, 3, 4) == [3] and asha_rungs(1, 3, 30) == [1, 3, 9, 27] and asha_rungs(4, 3, 4) == []
    assert [reach(e, [3], 3) for e in (1, 2, 3, 4)] == [1, 1, 1, pytest.approx(1 / 3)]


def test_estimate_without_training(monkeypatch):
    import torch

    from planning import estimate as est
    calls, precisions, batches = [], [], []

    def fake_speeds(combos, device, threads, log=print, precision="auto", batch=64):
        calls.append(combos)
        batches.append(batch)
        precisions.append(precision)
        return {f"{b}@{s}": {"frozen": 1e-4 * s, "train": 3e-4 * s, "eval": 5e-5 * s, "head": 1e-6 * s} for b, s in combos}
    monkeypatch.setattr(est, "speeds_for", fake_speeds)
    opts = Options(LITES, 4)
    points, _ = recipe_points(CPU, opts, BASE, {})
    e = est.estimate(CPU, opts, {}, BASE, points, n_train=800, n_val=200, device=torch.device("cpu"),
                     threads=1, parallel=2, num_samples=20, budget_s=600, rungs=[3], rf=3)
    assert {s for _, s in calls[0]} == {64, 96, 128, 160, 224}
    assert e.trial_asha_s < e.trial_fifo_s and e.n_warm == len(points)
    est.estimate(CPU, opts, {}, {**BASE, "precision": "bf16"}, points, n_train=800, n_val=200,
                 device=torch.device("cpu"), threads=1, parallel=2, num_samples=20, budget_s=600, rungs=[3], rf=3)
    assert precisions == ["auto", "bf16"]  # the trials' --precision is what gets timed
    assert batches == [64, 64]  # the median batch of the space's draws and the recipe points
    assert est.device_key(torch.device("cpu"), 2, "bf16").endswith("|threads2|bf16")
    assert "|bf16" not in est.device_key(torch.device("cpu"), 2)  # the default keeps its cache
    assert e.wall(20, True) < e.wall(20, False)
    assert 0 < e.trials_in(600, True)
    text = est.describe(e)
    assert "with ASHA" in text and "time budget" in text and "tf_efficientnet_lite0@224" in text


@pytest.mark.parametrize("fixed", [{"stage2_epochs": 2}, {"stage1_epochs": 1}, {"stage3_epochs": 1}])
def test_set_stage_epochs_never_make_a_recipe_point_over_budget(fixed):
    points, skipped = recipe_points(CPU, Options(LITES, 3), BASE, fixed)
    assert points  # the fine-tuning recipes still fit
    for p in points:
        c = p.config
        assert c["stage1_epochs"] + c["stage2_epochs"] + c["stage3_epochs"] == 3, (p.name, c)
        assert all(c[k] == v for k, v in fixed.items())
