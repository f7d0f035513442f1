"""The search around the incumbent: the local sampler's moves, trials told at their fidelity,
the recipe screen and its promotion, and the budget plan (no Ray: the searcher is driven by hand)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from analysis.experiment import duration
from analysis.study import CAL_LOSS_ATTR, FIDELITY_ATTR, LOSS_ATTR, MOVE_ATTR, STUDY_NAME, TRIAL_ATTR, WARM_CONFIG, study_url
from planning import incumbent
from planning.incumbent import IncumbentSampler, move, step_size
from planning.plan import plan_budget
from analysis.outcome import low_fidelity
from search.searcher import make_searcher
from spaces import Options, get_space
from spaces.warm_start import recipe_points

CPU = get_space("cpu")
LITE0 = ("tf_efficientnet_lite0",)
BASE = {"pretrained": True, "weights_dir": "", "seed": 0, "compile": False}


# ------------------------------------------------------------------ one parameter's move

def test_log_float_moves_a_fixed_fraction_of_a_decade_either_way():
    rng = np.random.default_rng(0)
    d = FloatDistribution(1e-5, 1e-1, log=True)
    moved = np.array([move(1e-3, d, 1.0, rng) for _ in range(400)])
    decades = np.log10(moved / 1e-3)
    assert all(d.low <= v <= d.high for v in moved)
    assert np.all((np.abs(decades) >= 0.3 - 1e-9) & (np.abs(decades) <= 0.5 + 1e-9))  # 0.4 decade +-25 %
    assert 0.3 < np.mean(decades > 0) < 0.7  # up and down alike
    assert all(move(1e-3, d, 1.0, rng, sign=1) > 1e-3 for _ in range(20))
    assert move(0.1, d, 1.0, rng, sign=1) < 0.1  # at the edge: inward
    wide = np.abs(np.log10(np.array([move(1e-3, d, 4.0, rng) for _ in range(400)]) / 1e-3))
    assert np.median(wide) > 2 * np.median(np.abs(decades))  # a bigger step moves further


def test_ordinal_choices_move_one_step_and_others_are_resampled():
    rng = np.random.default_rng(1)
    sizes = CategoricalDistribution([64, 96, 128, 160, 224])
    assert {move(128, sizes, 1.0, rng) for _ in range(50)} == {96, 160}
    assert {move(224, sizes, 1.0, rng) for _ in range(50)} == {160}  # at the edge: inward only
    opt = CategoricalDistribution(["sgd", "adamw", "rmsprop"])
    assert {move("sgd", opt, 1.0, rng) for _ in range(50)} == {"adamw", "rmsprop"}
    assert {move(3, IntDistribution(1, 7), 1.0, rng) for _ in range(50)} == {2, 4}


def _trial(number: int, value: float | None, params: dict, state=TrialState.COMPLETE, **attrs):
    dists = {"lr": FloatDistribution(1e-5, 1e-1, log=True), "size": CategoricalDistribution([64, 128, 224]),
             "opt": CategoricalDistribution(["sgd", "adamw"])}
    t = optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params}, value=value,
                                  state=state, user_attrs=attrs.get("user", {}),
                                  system_attrs=attrs.get("system", {}),
                                  intermediate_values=attrs.get("steps", {}))
    t.number = number  # as in a study
    return t


def test_the_step_doubles_after_a_success_and_halves_after_two_failures():
    def local(n: int, value: float, parent_value: float):
        return _trial(n, value, {"lr": 1e-3}, system={MOVE_ATTR: {"kind": "local", "parent_value": parent_value,
                                                                 "parent_full": True}})
    assert step_size([]) == 1.0
    assert step_size([local(0, 0.6, 0.5)]) == 2.0
    assert step_size([local(0, 0.4, 0.5), local(1, 0.4, 0.5)]) == 0.5
    assert step_size([local(0, 0.6, 0.5), local(1, 0.4, 0.6), local(2, 0.4, 0.6)]) == 1.0
    assert step_size([local(0, 0.6, 0.5), local(1, 0.7, 0.6), local(2, 0.8, 0.7)]) == 2.0  # capped: x40 lr moves lost
    # a move of a screen trial is compared with a value measured on a fraction of the data: no success
    of_screen = _trial(0, 0.6, {"lr": 1e-3}, system={MOVE_ATTR: {"kind": "local", "parent_value": 0.2,
                                                                 "parent_full": False}})
    assert step_size([of_screen]) == 1.0


def test_moves_start_from_the_best_full_fidelity_trial_change_one_or_two_names_and_never_repeat():
    trials = [_trial(0, 0.5, {"lr": 1e-3, "size": 224, "opt": "adamw"}),
              _trial(1, 0.3, {"lr": 1e-2, "size": 64, "opt": "sgd"}),
              # a better value at low fidelity is not the incumbent
              _trial(2, 0.9, {"lr": 1e-4, "size": 128, "opt": "sgd"}, state=TrialState.PRUNED,
                     user={FIDELITY_ATTR: 0.2}, steps={1: 0.9})]
    sampler = IncumbentSampler(optuna.samplers.RandomSampler(seed=0), seed=0, p_local=1.0)
    seen = []
    for n in range(3, 40):
        m = sampler.plan(trials, n)
        assert m["parent"] == 0 and 1 <= len(m["changed"]) <= 2
        assert {k for k in m["params"] if m["params"][k] != trials[0].params[k]} == set(m["changed"])
        assert m["params"] not in seen
        seen.append(m["params"])
        trials.append(_trial(n, None, m["params"], state=TrialState.RUNNING))


def test_moves_prefer_learning_rates_and_never_pair_a_categorical():
    trials = [_trial(0, 0.5, {"lr": 1e-3, "size": 128, "opt": "adamw"})]
    sampler = IncumbentSampler(optuna.samplers.RandomSampler(seed=0), seed=0, p_local=1.0)
    moves = [sampler.plan(trials, n) for n in range(1, 400)]
    first = [m["changed"] for m in moves]
    count = {k: sum(k in c for c in first) for k in ("lr", "size", "opt")}
    assert count["lr"] > count["size"] > count["opt"] > 0  # kind shares 0.5 : 0.25 (ordinal) : 0.1
    assert not any("opt" in c and len(c) > 1 for c in first)
    assert 0.1 < np.mean([len(c) == 2 for c in first]) < 0.4


def test_a_failed_move_is_reversed_and_a_successful_one_repeated():
    parent = _trial(0, 0.5, {"lr": 1e-3, "size": 128, "opt": "adamw"})
    up = {"kind": "local", "parent": 0, "parent_value": 0.5, "parent_full": True, "changed": ["lr"], "dirs": {"lr": 1}}
    failed = _trial(1, 0.4, {"lr": 2.5e-3, "size": 128, "opt": "adamw"}, system={MOVE_ATTR: up})
    sampler = IncumbentSampler(optuna.samplers.RandomSampler(seed=0), seed=0, p_local=1.0)
    moves = [sampler.plan([parent, failed], n) for n in range(2, 60)]
    reversed_ = [m for m in moves if m["dirs"] == {"lr": -1}]
    assert 0.3 < len(reversed_) / len(moves) < 0.8  # P_FOLLOW of the time, plus chance
    won = _trial(1, 0.6, {"lr": 2.5e-3, "size": 128, "opt": "adamw"}, system={MOVE_ATTR: up})
    moves = [sampler.plan([parent, won], n) for n in range(2, 60)]
    assert all(m["parent"] == 1 for m in moves)
    assert 0.3 < np.mean([m["dirs"] == {"lr": 1} for m in moves]) < 0.8
    assert all(m["step"] == 2.0 for m in moves)  # and the step doubled after the success


def test_a_flat_move_counts_neither_way_and_its_name_is_not_moved_from_that_parent_again():
    """Seen in a duel: weight-decay moves of a head-only 3-epoch fit tied their parent's val_acc four times,
    each counted as a failure, and the step of the learning-rate moves was halved twice."""
    parent = _trial(0, 0.5, {"lr": 1e-3, "size": 128, "opt": "adamw"}, user={LOSS_ATTR: 2.0})

    def child(n: int, name: str, value: float, loss: float):
        m = {"kind": "local", "parent": 0, "parent_value": 0.5, "parent_loss": 2.0, "parent_full": True,
             "changed": [name], "dirs": {name: 1}}
        params = {**parent.params, name: {"size": 224, "lr": 2.5e-3, "opt": "sgd"}[name]}
        return _trial(n, value, params, system={MOVE_ATTR: m}, user={LOSS_ATTR: loss})
    flat = [child(1, "size", 0.5, 2.0005), child(2, "size", 0.5, 1.9999)]
    assert step_size([parent, *flat]) == 1.0  # two ties that changed nothing: no halving
    assert step_size([parent, child(1, "size", 0.5, 1.9), child(2, "size", 0.5, 2.1)]) == 0.5  # ties, not flat
    sampler = IncumbentSampler(optuna.samplers.RandomSampler(seed=0), seed=0, p_local=1.0)
    moves = [sampler.plan([parent, flat[0]], n) for n in range(3, 200)]
    assert not any("size" in m["changed"] for m in moves)
    assert {"lr", "opt"} <= {n for m in moves for n in m["changed"]}
    assert all(m["parent_loss"] == 2.0 for m in moves)
    lossy = [sampler.plan([parent, child(1, "size", 0.5, 1.9)], n) for n in range(3, 200)]
    assert any("size" in m["changed"] for m in lossy)  # the same val_acc with another loss: not flat


def test_before_any_full_fidelity_result_the_best_screen_trial_is_moved():
    trials = [_trial(0, 0.2, {"lr": 1e-3, "size": 64, "opt": "sgd"}, state=TrialState.PRUNED,
                     user={FIDELITY_ATTR: 0.2}, steps={3: 0.2}),
              _trial(1, 0.4, {"lr": 1e-2, "size": 224, "opt": "adamw"}, state=TrialState.PRUNED,
                     user={FIDELITY_ATTR: 0.2}, steps={3: 0.4})]
    m = IncumbentSampler(optuna.samplers.RandomSampler(seed=0), seed=0, p_local=1.0).plan(trials, 2)
    assert m["parent"] == 1
    assert IncumbentSampler(optuna.samplers.RandomSampler(), p_local=1.0).plan([], 0) is None


def test_a_move_that_opens_a_stage_starts_it_from_a_fine_tuning_prior(tmp_path: Path, monkeypatch):
    """The thirteenth session's seeds 6 and 8: moves that unfroze the frozen recipe's top blocks got stage-2
    lrs of 0.05-0.08 (AdamW) from TPE's draw and diverged. The new stage starts at a tenth of stage 1's lr."""
    opts = Options(LITE0, 3)
    points, _ = recipe_points(CPU, opts, BASE, {})
    frozen = next(p for p in points if p.name.startswith("efficientnetv2_frozen"))
    assert frozen.config["stage2_epochs"] == 0
    searcher = make_searcher(CPU, opts, {}, BASE, 0, tmp_path, [frozen], [], "incumbent")
    monkeypatch.setattr(incumbent, "_pick", lambda parent, trials, rng: {"stage2_epochs": 1})
    monkeypatch.setattr(incumbent, "_follow", lambda *a: None)
    configs = _drive(searcher, 6, lambda c: 0.5)
    study = optuna.load_study(study_name=STUDY_NAME, storage=study_url(tmp_path))
    opened = [configs[t.number] for t in study.trials
              if (t.system_attrs.get(MOVE_ATTR) or {}).get("changed") == ["stage2_epochs"]]
    assert opened, "no move opened stage 2"
    for c in opened:
        assert c["stage2_epochs"] > 0
        assert c["stage2_lr"] == pytest.approx(frozen.config["stage1_lr"] * incumbent.NEW_STAGE_LR)
        assert all(c[k] == frozen.config[k] for k in ("unfreeze_depth", "backbone_lr_scale", "layer_decay"))


def test_an_opened_name_is_clipped_or_left_to_the_model():
    lr = FloatDistribution(1e-5, 1e-1, log=True)
    m = {"params": {"stage1_lr": 5e-5, "stage2_lr": 1e-2}, "extra": {"unfreeze_depth": 9}}
    assert incumbent.opened("stage3_lr", m, lr) == pytest.approx(1e-3)  # the nearest earlier stage's
    assert incumbent.opened("stage2_lr", {"params": {"stage1_lr": 5e-5}}, lr) == 1e-5  # a tenth, clipped
    assert incumbent.opened("stage2_lr", {"params": {}}, lr) is None  # no earlier stage: the model draws it
    assert incumbent.opened("unfreeze_depth", m, IntDistribution(1, 7)) is None  # the parent's is outside
    assert incumbent.opened("layer_decay", m, FloatDistribution(0.5, 1.0)) == 0.75  # TrialConfig's default


# ------------------------------------------------------------------ fidelity, screen, promotion

def test_low_fidelity_is_a_cut_plan_or_a_data_fraction_never_an_early_stop_or_a_failure():
    cfg = {"config/stage1_epochs": 1, "config/stage2_epochs": 2}
    assert low_fidelity({**cfg, "epoch": 1, "status": "ok"})  # ASHA stopped it at a rung
    assert not low_fidelity({**cfg, "epoch": 3, "status": "ok"})
    assert not low_fidelity({**cfg, "epoch": 2, "status": "ok", "early_stopped": True})
    assert low_fidelity({**cfg, "epoch": 3, "status": "ok", "config/train_fraction": 0.25})
    assert not low_fidelity({**cfg, "epoch": 1, "status": "oom"})
    assert not low_fidelity({"best_val_acc": 0.5})  # no config: nothing to compare with


def _drive(searcher, n: int, score) -> list[dict]:
    configs = []
    for i in range(n):
        c = searcher.suggest(f"t{i}")
        if c is None:
            break
        epochs = c["stage1_epochs"] + c["stage2_epochs"] + c["stage3_epochs"]
        res = {"best_val_acc": score(c), "epoch": epochs, "status": "ok",
               **{f"config/{k}": v for k, v in c.items()}}
        for e in range(1, epochs + 1):
            searcher.on_trial_result(f"t{i}", {**res, "training_iteration": e})
        searcher.on_trial_complete(f"t{i}", res)
        configs.append(c)
    return configs


def _score(c: dict) -> float:
    """Made up: 224 px frozen extractors are best; a fraction of the data scores lower."""
    v = 0.5 if c["input_size"] == 224 and c["stage2_epochs"] == 0 else 0.2
    return v * (0.6 if c["train_fraction"] < 1 else 1.0) + 1e-3 * c["input_size"] / 224


def test_the_screen_runs_every_recipe_point_on_a_fraction_then_promotes_the_best_at_full_fidelity(tmp_path: Path):
    opts = Options(LITE0, 3)
    points, _ = recipe_points(CPU, opts, BASE, {})
    searcher = make_searcher(CPU, opts, {}, BASE, 0, tmp_path, points, [], "incumbent",
                             screen_fraction=0.2, promote=2)
    configs = _drive(searcher, len(points) + 6, _score)
    n = len(points)
    assert [c["train_fraction"] for c in configs[:n]] == [0.2] * n
    assert [{k: v for k, v in c.items() if k != "train_fraction"} for c in configs[:n]] == \
           [{k: v for k, v in p.config.items() if k != "train_fraction"} for p in points]
    study = optuna.load_study(study_name=STUDY_NAME, storage=study_url(tmp_path))
    trials = study.trials
    assert all(t.state == TrialState.PRUNED for t in trials[:n])  # low fidelity: never ranked as complete
    promoted = trials[n:n + 2]
    screen_best = sorted(trials[:n], key=lambda t: -t.intermediate_values[t.last_step])[:2]
    assert [t.user_attrs["promoted_from"] for t in promoted] == [t.number for t in screen_best]
    assert all(t.user_attrs[WARM_CONFIG]["train_fraction"] == 1.0 and t.state == TrialState.COMPLETE for t in promoted)
    assert [c["train_fraction"] for c in configs[n:]] == [1.0] * (len(configs) - n)
    # the searcher's own proposals follow; the local ones keep the recipe's unsampled fields
    own = [t for t in trials[n + 2:] if (t.system_attrs.get(MOVE_ATTR) or {}).get("kind") == "local"]
    assert own, "no local move in 6 proposals at p_local 0.6"
    for t in own:
        parent = study.trials[t.system_attrs[MOVE_ATTR]["parent"]]
        assert parent.state == TrialState.COMPLETE
        cfg = configs[t.number]
        assert cfg["augment"] == parent.user_attrs[WARM_CONFIG]["augment"]


def test_points_the_plan_runs_whole_are_full_fidelity_trials_and_the_screen_promotes_among_the_others(tmp_path: Path):
    opts = Options(LITE0, 3)
    points, _ = recipe_points(CPU, opts, BASE, {})
    fractions = [1.0, 0.2, 1.0, 0.2, 0.2][:len(points)]
    searcher = make_searcher(CPU, opts, {}, BASE, 0, tmp_path, points[:len(fractions)], [], "incumbent",
                             screen_fraction=fractions, promote=1)
    configs = _drive(searcher, len(fractions) + 3, _score)
    assert [c["train_fraction"] for c in configs[:len(fractions)]] == fractions
    trials = optuna.load_study(study_name=STUDY_NAME, storage=study_url(tmp_path)).trials
    states = [t.state for t in trials[:len(fractions)]]
    assert states == [TrialState.COMPLETE if f == 1 else TrialState.PRUNED for f in fractions]
    promoted = [t for t in trials if t.user_attrs.get("promoted_from") is not None]
    assert len(promoted) == 1 and fractions[promoted[0].user_attrs["promoted_from"]] < 1


def test_the_screen_promotes_by_val_loss_where_val_acc_counts_a_few_right_answers(tmp_path: Path):
    """The thirteenth session's seed 10: the frozen recipe had the lowest val_loss of the screen but the
    fifth val_acc (0.01 of 200 images), was not promoted, and the search lost by 9 points."""
    opts = Options(LITE0, 3)
    points, _ = recipe_points(CPU, opts, BASE, {})
    searcher = make_searcher(CPU, opts, {}, BASE, 0, tmp_path, points[:4], [], "incumbent",
                             screen_fraction=0.2, promote=2)
    screen = [searcher.suggest(f"t{i}") for i in range(4)]
    for i, (acc, loss) in enumerate([(0.03, 4.58), (0.025, 4.75), (0.01, 4.57), (0.01, 4.60)]):
        res = {"best_val_acc": acc, "val_loss": loss, "epoch": 3, "training_iteration": 3, "status": "ok",
               **{f"config/{k}": v for k, v in screen[i].items()}}
        searcher.on_trial_complete(f"t{i}", res)
    promoted = [searcher.suggest(f"t{i}") for i in (4, 5)]
    strip = lambda c: {k: v for k, v in c.items() if k != "train_fraction"}  # noqa: E731
    assert [strip(c) for c in promoted] == [strip(screen[2]), strip(screen[0])]
    assert all(c["train_fraction"] == 1.0 for c in promoted)


def test_the_screen_promotes_by_the_calibrated_loss(tmp_path: Path):
    """The fine-tuning duel's seed 6 (BENCHMARKS.md, 2026-12-07; the checkpoints re-evaluated): by val_loss the
    screen promoted the label-smoothed, mixup resnet50_3stage_224 point (4.614; 0.5-3 % val at full fidelity), by
    the calibrated loss it ranks last (4.601) behind mobilenetv2_2stage_128 (4.569; 6.5 %) and 2phase_96 (4.577; 18.5 %)."""
    opts = Options(LITE0, 3)
    points, _ = recipe_points(CPU, opts, BASE, {})
    searcher = make_searcher(CPU, opts, {}, BASE, 0, tmp_path, points[:3], [], "incumbent",
                             screen_fraction=0.25, promote=2)
    screen = [searcher.suggest(f"t{i}") for i in range(3)]
    for i, (acc, loss, cal) in enumerate([(0.02, 4.790, 4.5769), (0.005, 4.6165, 4.5687), (0.005, 4.6136, 4.6007)]):
        res = {"best_val_acc": acc, "val_loss": loss, "val_cal_loss": cal, "epoch": 3, "training_iteration": 3,
               "status": "ok", **{f"config/{k}": v for k, v in screen[i].items()}}
        searcher.on_trial_complete(f"t{i}", res)
    promoted = [searcher.suggest(f"t{i}") for i in (3, 4)]
    strip = lambda c: {k: v for k, v in c.items() if k != "train_fraction"}  # noqa: E731
    assert [strip(c) for c in promoted] == [strip(screen[1]), strip(screen[0])]


def test_while_the_screens_last_trials_run_no_own_proposal_starts_and_the_promotions_come_first(tmp_path: Path):
    opts = Options(LITE0, 3)
    points, _ = recipe_points(CPU, opts, BASE, {})
    searcher = make_searcher(CPU, opts, {}, BASE, 0, tmp_path, points[:3], [], "incumbent",
                             screen_fraction=0.2, promote=1)
    screen = [searcher.suggest(f"t{i}") for i in range(3)]  # two workers and a third trial: all running
    assert all(c["train_fraction"] == 0.2 for c in screen)
    assert searcher.suggest("t3") is None  # a free worker waits: only screen values exist yet
    for i, c in enumerate(screen[:2]):
        res = {"best_val_acc": 0.1 * (i + 1), "epoch": 3, "training_iteration": 3, "status": "ok",
               **{f"config/{k}": v for k, v in c.items()}}
        searcher.on_trial_complete(f"t{i}", res)
        assert searcher.suggest("t3") is None, "a screen trial still runs"
    c = screen[2]
    searcher.on_trial_complete("t2", {"best_val_acc": 0.05, "epoch": 3, "training_iteration": 3, "status": "ok",
                                      **{f"config/{k}": v for k, v in c.items()}})
    promoted = searcher.suggest("t3")
    assert promoted["train_fraction"] == 1.0
    assert {k: v for k, v in promoted.items() if k != "train_fraction"} == \
           {k: v for k, v in screen[1].items() if k != "train_fraction"}  # the screen's best (0.2)
    assert searcher.suggest("t4") is not None  # the screen has ended: the searcher proposes again


def test_an_asha_stopped_trial_is_told_pruned_with_its_rung_values(tmp_path: Path):
    searcher = make_searcher(CPU, Options(LITE0, 3), {}, BASE, 0, tmp_path, [], [], "tpe")
    c = searcher.suggest("t0")
    res = {"best_val_acc": 0.3, "epoch": 1, "status": "ok", **{f"config/{k}": v for k, v in c.items()}}
    searcher.on_trial_result("t0", {**res, "training_iteration": 1})
    searcher.on_trial_complete("t0", {**res, "val_loss": 3.5})  # stopped at epoch 1 of 3
    t = optuna.load_study(study_name=STUDY_NAME, storage=study_url(tmp_path)).trials[0]
    assert t.state == TrialState.PRUNED and t.intermediate_values == {1: 0.3}
    assert t.user_attrs[LOSS_ATTR] == 3.5  # beside its value, for the local search's flat moves


def test_a_planned_point_lost_in_a_driver_crash_is_enqueued_again_on_restore(tmp_path: Path):
    from search.searcher import requeue_lost
    opts = Options(LITE0, 3)
    points, _ = recipe_points(CPU, opts, BASE, {})
    searcher = make_searcher(CPU, opts, {}, BASE, 0, tmp_path, points[:3], [], "incumbent",
                             screen_fraction=0.2, promote=1)
    searcher.suggest("t0")
    searcher.suggest("t1")  # asked, then the driver died before saving that it had
    study = searcher._ot_study
    assert requeue_lost(study, {0}) == [1]
    trials = study.get_trials()
    assert trials[1].state == TrialState.FAIL and trials[-1].state == TrialState.WAITING
    assert trials[-1].user_attrs[WARM_CONFIG] == trials[1].user_attrs[WARM_CONFIG]
    assert requeue_lost(study, {0}) == []  # t0 is known: it is running again under Tune


def test_a_planned_point_lost_before_its_params_were_written_is_enqueued_whole(tmp_path: Path):
    """CI's second clean-clone run of the eleventh session: the kill fell between Optuna's ask (which
    pops the enqueued point, RUNNING with no params yet) and the define-by-run; requeued with those
    empty params, the point's other fields were drawn by the sampler and the resume exited 2 on
    'bad trial config: plateau_patience needs schedule=constant'."""
    from search.searcher import requeue_lost
    opts = Options(LITE0, 3)
    points, _ = recipe_points(CPU, opts, BASE, {})
    frozen = next(p for p in points if p.config["plateau_patience"] > 0)  # only a constant schedule has one
    searcher = make_searcher(CPU, opts, {}, BASE, 0, tmp_path, [frozen], [], "incumbent")
    study = searcher._ot_study
    study.ask()  # popped; the driver died before the define-by-run wrote a param
    assert study.get_trials()[0].params == {}
    assert requeue_lost(study, set()) == [0]
    for i in range(5):  # the requeued point is asked again, whole; its neighbours are valid configs too
        config = searcher.suggest(f"t{i}")
        if i == 0:
            assert config == frozen.config


def test_a_restored_searcher_follows_the_trials_tune_restored(tmp_path: Path):
    """A kill during Tune's save leaves its trials, the searcher's file and the study each a trial ahead of
    another (CI saw the search's count one ahead: 8 trials of 9); the restored searcher follows Tune's."""
    opts = Options(LITE0, 3)
    points, _ = recipe_points(CPU, opts, BASE, {})
    searcher = make_searcher(CPU, opts, {}, BASE, 0, tmp_path, points[:6], [], "incumbent")
    study, ot_trials, told = searcher._ot_study, searcher._ot_trials, searcher._completed_trials
    ids = [f"t{i}" for i in range(6)]
    configs = {i: searcher.suggest(i) for i in ids}

    def ended(trial_id, value):
        return {"best_val_acc": value, "epoch": 99, "status": "ok",
                **{f"config/{k}": v for k, v in configs[trial_id].items()}}
    for trial_id in ("t0", "t1", "t5"):
        searcher.on_trial_complete(trial_id, ended(trial_id, 0.5))
    told.discard("t1")  # the study has t1's value, the searcher's file not
    del ot_trials["t2"]  # asked for after the searcher's file was written, before Tune's
    started = searcher.follow(live={"t1", "t2"}, ended={"t0": ended("t0", 0.5), "t4": ended("t4", 0.4)})
    # Tune restored t0-t2 and t4 (t4 ended, its end never told) and lost t3 and t5 (t5's value is in the study)
    assert started == 5
    by_number = study.get_trials()
    assert [t.state for t in by_number[:6]] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING,
                                                TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert by_number[4].value == 0.4
    assert by_number[-1].state == TrialState.WAITING  # t3 again:
    assert by_number[-1].user_attrs[WARM_CONFIG] == by_number[3].user_attrs[WARM_CONFIG]
    searcher.on_trial_complete("t2", ended("t2", 0.3))  # followed: told when it ends
    searcher.on_trial_complete("t1", ended("t1", 0.1))  # a rerun of a trial the study has: ignored
    assert [t.value for t in study.get_trials()[:3]] == [0.5, 0.5, 0.3]


def test_a_screen_trials_final_result_which_only_on_trial_complete_sees_is_its_value(tmp_path: Path):
    opts = Options(LITE0, 3)
    points, _ = recipe_points(CPU, opts, BASE, {})
    searcher = make_searcher(CPU, opts, {}, BASE, 0, tmp_path, points[:2], [], "incumbent",
                             screen_fraction=0.2, promote=1)
    c = searcher.suggest("t0")
    res = {"best_val_acc": 0.2, "epoch": 2, "status": "ok", **{f"config/{k}": v for k, v in c.items()}}
    searcher.on_trial_result("t0", {**res, "epoch": 1, "best_val_acc": 0.1, "training_iteration": 1})
    searcher.on_trial_complete("t0", {**res, "epoch": 3, "best_val_acc": 0.3, "training_iteration": 3})
    t = optuna.load_study(study_name=STUDY_NAME, storage=study_url(tmp_path)).trials[0]
    assert t.state == TrialState.PRUNED and t.intermediate_values == {1: 0.1, 3: 0.3} and t.value == 0.3


# ------------------------------------------------------------------ the budget plan

def test_points_that_fit_a_third_of_the_budget_run_whole():
    p = plan_budget([100.0] * 3, [10.0] * 3, startup_s=5, parallel=1, own_trial_s=100, budget_s=3600,
                    num_samples=None)
    assert p.screen_fraction == 1.0 and p.promote == 0 and "run whole" in p.describe()


def test_points_that_do_not_fit_are_screened_on_a_fraction_and_the_best_third_promoted():
    train, val = [300.0] * 7, [30.0] * 7
    p = plan_budget(train, val, startup_s=5, parallel=2, own_trial_s=200, budget_s=2000, num_samples=None)
    assert 1 / 9 <= p.screen_fraction < 1 and p.promote == 3
    assert math.isclose(p.screen_s, (p.screen_fraction * 2100 + 210 + 35) / 2)
    assert p.screen_s <= 0.3 * 2000 and p.own_trials >= 3
    assert "screen the 7 recipe point(s)" in p.describe() and "promote the best 3" in p.describe()
    off = plan_budget(train, val, startup_s=5, parallel=2, own_trial_s=200, budget_s=2000, num_samples=None,
                      screen="off")
    assert off.screen_fraction == 1.0


def test_a_budget_too_short_to_learn_anything_says_so_with_the_budget_that_would():
    p = plan_budget([300.0] * 7, [30.0] * 7, startup_s=5, parallel=1, own_trial_s=300, budget_s=900,
                    num_samples=None)
    text = p.describe()
    assert p.own_trials < 3 and "too few" in text and "from about --time-budget" in text
    assert p.budget_needed() > 900
    # the budget counts from the command's start: the set-up it took is in the budget a user is told to give
    later = plan_budget([300.0] * 7, [30.0] * 7, startup_s=5, parallel=1, own_trial_s=300, budget_s=850,
                        num_samples=None, setup_s=50)
    assert later.budget_needed() == pytest.approx(p.budget_needed() + 50)


def test_a_budget_too_short_for_the_screen_and_one_promotion_runs_the_points_whole_cheapest_first():
    """The fourteenth session's 0.5x duel runs: the screen took what was left of 168-170 s and no promotion
    finished, so the search ended on screen values (1-3 images a class)."""
    train, val = [60.0, 20.0, 5.0, 90.0], [10.0, 5.0, 3.0, 12.0]
    p = plan_budget(train, val, startup_s=8, parallel=2, own_trial_s=50, budget_s=90, num_samples=None)
    assert (p.screen_fraction, p.promote, p.order, p.own_trials) == (1.0, 0, (2, 1, 0, 3), 0)
    assert "cheapest first" in p.describe()
    assert p.unfit_s > 90 and f"(~{duration(p.unfit_s)}, the promoted point after the screen) do not fit" in p.describe()
    roomy = plan_budget(train, val, startup_s=8, parallel=2, own_trial_s=50, budget_s=300, num_samples=None)
    assert roomy.screen_fraction < 1 and roomy.order == ()  # the screen and a promotion fit: screened as before


def test_a_point_whose_screen_run_would_be_mostly_start_up_runs_whole_and_the_others_are_screened():
    """The fine-tuning duel (BENCHMARKS.md, 2026-12-07 and -08): the best recipe, at 96 px, cost ~20 s whole and
    ~11 s screened; ranked at 1 image a class it was 3rd-4th of 6 on two seeds and never ran whole."""
    train, val = [10.0, 10.0, 28.0, 28.0, 104.0, 124.0], [2.0] * 6
    p = plan_budget(train, val, startup_s=8, parallel=2, own_trial_s=40, budget_s=300, num_samples=None)
    assert p.whole == (0, 1) and p.promote == 2 and 0 < p.screen_fraction < 1
    assert p.fractions() == [1.0, 1.0] + [p.screen_fraction] * 4
    assert math.isclose(p.screen_s, (20 + p.screen_fraction * 284 + 12 + 48) / 2)
    assert math.isclose(p.promote_s, 2 * (284 + 8 + 32) / 4 / 2)
    assert "screen 4 of the 6 recipe point(s)" in p.describe() and "the other 2 run whole" in p.describe()
    forced = plan_budget(train, val, startup_s=8, parallel=2, own_trial_s=40, budget_s=300, num_samples=None,
                         screen="on")
    assert forced.whole == () and forced.promote == 2 and forced.fractions() == [forced.screen_fraction] * 6


def test_the_fine_tuning_duels_seed_16_runs_its_cheap_points_whole():
    """The estimate of the fine-tuning duel's seed 16 (BENCHMARKS.md, 2026-12-08): 2phase_96 and 2stage_128 on
    lite0/lite1 cost 22-42 s whole; screened at 13 % they were mostly start-up, and the screen ranked (d)'s best
    point 3rd of 6. They now run whole; the two 224 px points are screened, but they and one promotion do not fit
    what is left of the 233 s, so every point runs whole, cheapest first (ASHA prunes the slow ones at its rung)."""
    train = [30.59, 13.86, 106.75, 31.63, 13.40, 132.36]
    val = [2.90, 1.00, 8.62, 2.19, 1.30, 9.97]
    p = plan_budget(train, val, startup_s=8, parallel=2, own_trial_s=40.15, budget_s=233.48, num_samples=None)
    assert (p.screen_fraction, p.order) == (1.0, (4, 1, 0, 3, 2, 5))
    # with a roomier budget the screen takes more of the data (23 %) and only the 96 px points are mostly start-up
    roomier = plan_budget(train, val, startup_s=8, parallel=2, own_trial_s=40.15, budget_s=300, num_samples=None)
    assert roomier.screen_fraction == 0.231 and roomier.whole == (1, 4) and roomier.promote == 2


def test_when_a_screen_would_save_too_little_of_all_but_one_point_every_point_runs_whole():
    p = plan_budget([10.0, 10.0, 120.0], [2.0] * 3, startup_s=8, parallel=1, own_trial_s=40, budget_s=480,
                    num_samples=None)
    assert (p.screen_fraction, p.promote, p.whole, p.fractions()) == (1.0, 0, (), [1.0] * 3)
    assert "run whole first" in p.describe()


@pytest.mark.parametrize("n, samples, screened", [(3, 16, False), (7, 16, True), (7, 32, False)])
def test_without_a_time_budget_the_points_fit_a_third_of_the_trials(n, samples, screened):
    p = plan_budget([100.0] * n, [10.0] * n, startup_s=5, parallel=1, own_trial_s=100, budget_s=None,
                    num_samples=samples)
    assert (p.screen_fraction < 1) == screened


# ------------------------------------------------------------------ through the CLI

def desync(exp: Path) -> None:
    """Leave Tune's files as a kill during their upload may (CI's run on record did): the search's count of
    trials one ahead of its trials, and the searcher's file missing the newest trial it asked for."""
    import pickle

    import ray.cloudpickle
    [gen] = exp.glob("search_gen_state-*.json")  # a pickle, whatever its name says
    state = ray.cloudpickle.loads(gen.read_bytes())
    gen.write_bytes(ray.cloudpickle.dumps({**state, "counter": state["counter"] + 1}))
    [path] = exp.glob("searcher-state-*.pkl")
    searcher = pickle.loads(path.read_bytes())
    asked = searcher["_ot_trials"]
    del asked[max(asked, key=lambda k: asked[k].number)]
    path.write_bytes(pickle.dumps(searcher))


def test_a_search_prints_its_plan_screens_the_recipes_promotes_the_best_and_resumes_the_plan(
        tmp_path, data_dir, weights_args):
    """Killed (driver and Ray, like a lost machine) during the screen, then resumed: the plan goes on."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from analysis.experiment import load_trials
    from tests.conftest import REPO, run_cli, wait_until_still
    from tests.test_faults import free_port  # other searches on this machine may hold Ray's 8265
    args = ["--gpus", 0, "--space", "cpu", "--max-epochs", 2, "--subset", 3, "--set", "input_size=32",
            "--scheduler", "fifo", "--data-dir", data_dir, "--storage-path", tmp_path, "--name", "plan",
            "--num-samples", 9, "--max-concurrent", 1, "--screen", "on", *weights_args]  # on: 32 px trials are
    exp = tmp_path / "plan"  # mostly start-up, which `auto` runs whole rather than screen
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "run_search.py", *map(str, args), "--dashboard-port", str(free_port())],
                                  cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None:
        if sum(1 for t in load_trials(exp) if t.epochs_run >= 2) >= 2:
            break
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    wait_until_still(exp)  # a worker of the killed search may still be writing
    assert "budget plan: screen the" in log.read_text()
    plan = json.loads((exp / "budget_plan.json").read_text())
    n = plan["points"]
    assert n >= 3 and 0 < plan["screen_fraction"] < 1 and plan["promote"] == math.ceil(n / 3)
    desync(exp)
    run_cli("run_search.py", "--resume", "--name", "plan", "--storage-path", tmp_path,
            "--dashboard-port", free_port(), check=True)
    trials = sorted(optuna.load_study(study_name=STUDY_NAME, storage=study_url(exp)).trials, key=lambda t: t.number)
    assert all(t.state.is_finished() for t in trials)
    # a point asked for just before the kill, which the restored search never knew, failed and ran again
    lost = [t for t in trials if t.state == TrialState.FAIL]
    trials = [t for t in trials if t.state != TrialState.FAIL]
    def attrs(t):  # the Tune trial it was asked for differs, and what it reported
        return {k: v for k, v in t.user_attrs.items() if k not in (TRIAL_ATTR, LOSS_ATTR, CAL_LOSS_ATTR)}
    assert len(trials) == 9 and all(any(attrs(t) == attrs(x) for t in trials) for x in lost)
    screen = [t for t in trials if t.user_attrs.get(FIDELITY_ATTR)]
    assert len(screen) == n and all(t.state == TrialState.PRUNED for t in screen)
    promoted = [t for t in trials if t.user_attrs.get("promoted_from") is not None]
    assert len(promoted) == plan["promote"] and all(t.state == TrialState.COMPLETE for t in promoted)
    best = sorted(screen, key=lambda t: (t.user_attrs[CAL_LOSS_ATTR], t.user_attrs[LOSS_ATTR]))[:plan["promote"]]
    assert {t.user_attrs["promoted_from"] for t in promoted} == {t.number for t in best}
    # the trials' own configs: screen trials on the fraction, every other at full fidelity
    # (a trial folder the kill left before its first epoch, never run, has no config)
    fractions = sorted(t.config["train_fraction"] for t in load_trials(exp) if t.results)
    assert fractions == [plan["screen_fraction"]] * n + [1.0] * (9 - n)
    # the report's first section: the winner against the best recipe point that ran at full fidelity
    from report.versus import best_recipe, origins, section
    records = load_trials(exp)
    where = origins(exp, records)
    rec = best_recipe(records, where)
    assert rec is not None and rec.config["train_fraction"] == 1.0 and where[rec.trial_id].startswith("recipe ")
    html = section(exp, records, tmp_path)
    assert "The winner against the best recipe" in html and (tmp_path / "incumbent.png").exists()
    assert where[rec.trial_id].removeprefix("recipe ") in html
