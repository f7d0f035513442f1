"""Tests for spaces/ and planning/define.py's DefineByRun, with real Optuna trials (no Ray run)."""
from __future__ import annotations

import dataclasses
import pickle
import random
import warnings

import optuna
import pytest
from optuna.samplers import TPESampler

from planning.define import DefineByRun
from planning.settings import SearchSettings
from search.searcher import make_searcher
from spaces import LISTED, NAMES, Options, Suggest, get_space, narrow, split_budget
from trainable.config import TrialConfig, coerce
from trainable.errors import UserError

optuna.logging.set_verbosity(optuna.logging.WARNING)

N_TRIALS = 40  # beyond TPE's 10 random start-up trials, so the model-based sampler runs too
BASE = {"pretrained": False, "weights_dir": "", "seed": 0, "compile": False}
FIELDS = {f.name for f in dataclasses.fields(TrialConfig)}
STAGE3_ONLY = {"stage3_lr", "stage3_epochs"}
STRUCTURE = {"stages"}  # a choice Optuna samples; the config holds the stage epochs it leads to


def _stages(cfg: dict) -> int:
    return 3 if cfg["stage3_epochs"] > 0 else 2


def _study(multivariate: bool = False) -> optuna.Study:
    with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna
        warnings.simplefilter("ignore")
        sampler = (TPESampler(seed=0, multivariate=True, group=True) if multivariate
                   else TPESampler(seed=0))
    return optuna.create_study(direction="maximize", sampler=sampler)


def _run(space_name: str, opts: Options | None = None, fixed: dict | None = None,
         n: int = N_TRIALS, multivariate: bool = False) -> list[tuple[dict, dict]]:
    """(config, trial.params) of n asked-and-told trials."""
    space = get_space(space_name)
    opts = opts or Options(space.backbones, space.max_epochs)
    dbr = DefineByRun(space, opts, coerce(fixed or {}), BASE)  # typed once, as SearchSettings.fixed does
    study, rng, out = _study(multivariate), random.Random(0), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            trial = study.ask()
            cfg = dbr(trial)
            out.append((cfg, dict(trial.params)))
            study.tell(trial, rng.random())
    return out


def _check_complete(cfg: dict, params: dict) -> TrialConfig:
    assert set(cfg) == FIELDS
    tc = TrialConfig.from_dict(cfg)  # validates
    assert tc.to_dict() == cfg  # already fully typed and resolved
    for k, v in params.items():  # every sampled value reaches the config unchanged
        assert k in STRUCTURE or cfg[k] == v, k
    for k, v in BASE.items():
        assert cfg[k] == v
    return tc


# --- every space ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_space_gives_complete_valid_configs(name):
    space = get_space(name)
    assert space.name == name and space.min_epochs <= space.max_epochs
    results = _run(name, multivariate=name == "default")
    for cfg, params in results:
        tc = _check_complete(cfg, params)
        assert cfg["backbone"] in space.backbones
        if not space.recipe:
            assert tc.total_epochs == space.max_epochs
        if tc.stage3_epochs == 0:
            assert not STAGE3_ONLY & set(params), params  # TPE never sees a meaningless value
            assert cfg["stage3_epochs"] == 0
        assert set(params) <= FIELDS | STRUCTURE
    if space.recipe:  # a fixed point: nothing sampled, the same config every time
        assert all(params == {} for _, params in results)
        assert all(cfg == results[0][0] for cfg, _ in results)
        assert TrialConfig.from_dict(results[0][0]).total_epochs == space.max_epochs
    elif name in ("default", "tiny"):  # both plans are explored, and the search really varies things
        assert {_stages(cfg) for cfg, _ in results} == {2, 3}
        assert len({cfg["stage1_lr"] for cfg, _ in results}) > N_TRIALS // 2


def test_faults_space_samples_sane_and_failing_trials():
    results = _run("faults")
    for cfg, params in results:
        assert set(params) <= {"backbone", "stage1_lr", "freeze_bn"}
        assert cfg["stage1_lr"] in (0.01, 1e12) and cfg["freeze_bn"] in (False, True)
        assert (cfg["stage1_epochs"], cfg["stage2_epochs"], cfg["stage3_epochs"]) == (1, 1, 0)
    assert {(cfg["stage1_lr"], cfg["freeze_bn"]) for cfg, _ in results} == \
        {(0.01, False), (0.01, True), (1e12, False), (1e12, True)}


@pytest.mark.parametrize("name", ["default", "cpu"])
def test_finetune_space_params_sampled_only_where_they_act(name):
    seen3 = frozen = False
    for cfg, params in _run(name, n=60):
        assert ("stage3_lr" in params) == (_stages(cfg) == 3)
        assert ("stage1_lr" in params) == (cfg["stage1_epochs"] > 0)
        assert ("unfreeze_depth" in params) == ("stage2_lr" in params) == (cfg["stage2_epochs"] > 0)
        assert ("layer_decay" in params) == (cfg["stage2_epochs"] + cfg["stage3_epochs"] > 0)
        if _stages(cfg) == 3:
            seen3 = True
            assert 1e-5 <= cfg["stage3_lr"] <= 3e-2 and cfg["stage3_epochs"] >= 1
        frozen |= cfg["stage1_epochs"] == get_space(name).max_epochs  # a frozen feature extractor
    assert seen3 and frozen


@pytest.mark.parametrize("name", ["default", "cpu"])
def test_finetune_space_ranges(name):
    m = get_space(name).max_epochs
    for cfg, _ in _run(name):
        assert cfg["input_size"] in (64, 96, 128, 160, 224) and cfg["batch_size"] in (32, 64, 128)
        assert 1 <= cfg["unfreeze_depth"] <= 7 and cfg["optimizer"] in ("sgd", "adamw", "rmsprop")
        # stage 1 is at most half the budget unless it is the whole plan (frozen extractor)
        assert cfg["stage1_epochs"] <= m // 2 or cfg["stage1_epochs"] == m
        assert 1e-4 <= cfg["stage1_lr"] <= 1e-1 and 1e-5 <= cfg["stage2_lr"] <= 1e-1


def test_tiny_space_is_cpu_sized():
    for cfg, params in _run("tiny"):
        assert 32 <= cfg["input_size"] <= 64 and cfg["input_size"] in (32, 48, 64)
        assert TrialConfig.from_dict(cfg).total_epochs <= 4
        assert cfg["batch_size"] in (32, 64)
        assert cfg["stage1_epochs"] == 1 and "stage1_epochs" not in params  # a one-value range
        if _stages(cfg) == 3:
            assert (cfg["stage1_epochs"], cfg["stage2_epochs"], cfg["stage3_epochs"]) == (1, 2, 1)
            assert "stage3_lr" in params and "layer_decay" not in params  # tiny keeps the default


@pytest.mark.parametrize("name, max_epochs", [("default", 2), ("default", 3), ("default", 10),
                                              ("tiny", 2), ("tiny", 3), ("cpu", 1), ("cpu", 2)])
def test_narrowed_epoch_budget_is_filled_exactly(name, max_epochs):
    space = get_space(name)
    stages = set()
    for cfg, params in _run(name, Options(space.backbones, max_epochs), n=25):
        tc = _check_complete(cfg, params)
        assert tc.total_epochs == max_epochs
        stages.add(_stages(cfg))
    if name == "tiny":
        assert stages == ({2} if max_epochs < 3 else {2, 3})  # tiny's 3 stages need 3 epochs
    else:  # every plan of the fine-tune space fits any budget (stage 3 alone is a plan)
        assert stages == {2, 3}


def test_narrowed_backbones():
    opts = Options(("resnet18", "mobilenetv2_100"), 30)
    backbones = {cfg["backbone"] for cfg, _ in _run("default", opts, n=25)}
    assert backbones == {"resnet18", "mobilenetv2_100"}
    one = _run("default", Options(("resnet50",), 30), n=5)
    assert {cfg["backbone"] for cfg, _ in one} == {"resnet50"}
    assert all("backbone" not in params for _, params in one)  # a one-choice list is not sampled


# --- --set overrides -----------------------------------------------------------------------------

def test_fixed_values_win_and_are_not_sampled():
    fixed = {"batch_size": "256", "backbone": "resnet18", "stage1_lr": "0.05", "head": "coarse_to_fine"}
    for cfg, params in _run("default", fixed=fixed, n=20):
        _check_complete(cfg, params)
        assert (cfg["batch_size"], cfg["backbone"], cfg["stage1_lr"], cfg["head"]) == \
               (256, "resnet18", 0.05, "coarse_to_fine")
        assert not set(fixed) & set(params)


def test_fixed_stage3_epochs_make_three_stages_and_sample_the_stage3_lr():
    results = _run("default", fixed={"stage3_epochs": "5"}, n=20)
    for cfg, params in results:
        tc = _check_complete(cfg, params)
        assert tc.stage3_epochs == 5 and tc.total_epochs == 30
        assert "stages" not in params and "stage3_lr" in params


def test_fixed_two_stages_never_samples_stage3():
    for cfg, params in _run("tiny", fixed={"stage3_epochs": 0}, n=15):
        assert cfg["stage3_epochs"] == 0 and not (STAGE3_ONLY | STRUCTURE) & set(params)


def test_fixed_epochs_in_the_budget_split():
    for cfg, params in _run("tiny", fixed={"stage3_epochs": "1"}, n=10):
        assert (cfg["stage1_epochs"], cfg["stage2_epochs"], cfg["stage3_epochs"]) == (1, 2, 1)
        assert "stage3_epochs" not in params


@pytest.mark.parametrize("space_name", ["cpu", "default"])
@pytest.mark.parametrize("fixed", [{"stage1_epochs": "1"}, {"stage2_epochs": "2"}, {"stage1_epochs": "1", "stage2_epochs": "1"}])
def test_a_set_stage_keeps_its_epochs_and_every_plan_fills_the_budget(space_name, fixed):
    # `--set stage1_epochs=1`: one head epoch, then a fine-tune; 3-stage plans drew stage 3 from the
    # whole budget and left stage 2 -1 epochs (one draw in six failed)
    results = _run(space_name, Options(get_space(space_name).backbones[:1], 3), fixed, n=40)
    assert {_stages(cfg) for cfg, _ in results} == ({3} if len(fixed) == 2 else {2, 3})
    for cfg, _ in results:
        epochs = [cfg[f"stage{k}_epochs"] for k in (1, 2, 3)]
        assert min(epochs) >= 0 and sum(epochs) == 3, epochs
        assert all(cfg[k] == int(v) for k, v in fixed.items()), (epochs, fixed)


def test_fixed_overrides_a_recipe():
    for cfg, params in _run("mobilenetv2_2stage_128", fixed={"batch_size": "64", "stage2_epochs": "3"}, n=3):
        assert cfg["batch_size"] == 64 and cfg["stage2_epochs"] == 3 and cfg["input_size"] == 128
        assert params == {}


def test_plateau_patience_only_with_a_constant_schedule():
    results = _run("default", n=40, multivariate=True)
    assert {cfg["schedule"] for cfg, _ in results} == {"cosine", "onecycle", "constant", "step"}
    for cfg, params in results:
        assert ("plateau_patience" in params) == (cfg["schedule"] == "constant")


def test_fixed_unknown_or_bad_value_is_a_user_error():
    for item, fragment in (("nope=1", "unknown hyper-parameter(s) nope"),
                           ("stage1_epochs=two", "stage1_epochs='two' is not a valid int")):
        with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            SearchSettings(set=[item]).fixed()


# --- Suggest and split_budget --------------------------------------------------------------------

class _NoTrial:
    """A trial that must not be asked anything."""

    def __getattr__(self, name):
        raise AssertionError(f"sampled {name}")


def test_suggest_returns_the_set_values_typed():
    fixed = SearchSettings(set=["stage3_epochs=3", "stage1_lr=1e-3", "freeze_bn=no", "backbone=resnet18"]).fixed()
    s = Suggest(_NoTrial(), fixed)
    assert s.int("stage3_epochs", 1, 9) == 3
    assert s.float("stage1_lr", 1e-4, 1e-1, log=True) == 1e-3
    assert s.cat("freeze_bn", [False, True]) is False
    assert s.cat("backbone", ["resnet18", "resnet50"]) == "resnet18"
    # degenerate ranges are not sampled either
    assert s.int("unfreeze_depth", 2, 2) == 2 and s.float("aug_strength", 0.5, 0.5) == 0.5
    assert s.cat("optimizer", ["sgd"]) == "sgd"


def test_split_budget():
    s = Suggest(_NoTrial(), {"stage1_epochs": 2, "stage3_epochs": 3})
    assert split_budget(s, Options(("x",), 10), 3, stage1_max=4) == \
           {"stage1_epochs": 2, "stage2_epochs": 5, "stage3_epochs": 3}
    assert split_budget(Suggest(_NoTrial()), Options(("x",), 2), 2, stage1_max=1) == \
           {"stage1_epochs": 1, "stage2_epochs": 1, "stage3_epochs": 0}


def test_get_space_unknown():
    with pytest.raises(UserError) as e:
        get_space("huge")
    msg = str(e.value)
    assert "\n" not in msg and "unknown space 'huge'" in msg and all(n in msg for n in LISTED)
    assert "faults" not in msg  # test scaffolding: runs with --space faults, not offered


# --- pickling (Tune pickles the searcher to resume it) -------------------------------------------

def test_define_by_run_pickles():
    space = get_space("default")
    dbr = DefineByRun(space, Options(("resnet18", "resnet50"), 12), {"batch_size": 64}, BASE)
    clone = pickle.loads(pickle.dumps(dbr))
    assert clone.space == dbr.space and clone.opts == dbr.opts and clone.fixed == dbr.fixed
    a, b = dbr(_study().ask()), clone(_study().ask())  # same seed, same sample
    assert a == b and a["batch_size"] == 64
    assert a["stage1_epochs"] + a["stage2_epochs"] + a["stage3_epochs"] == 12


def test_searcher_builds_with_define_by_run(tmp_path):
    space = get_space("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        searcher = make_searcher(space, Options(space.backbones, 4), {}, BASE, seed=0, exp=tmp_path)
    assert isinstance(searcher._space, DefineByRun)
    pickle.loads(pickle.dumps(searcher._space))


def test_narrow_reads_the_users_backbones_and_epochs_one_way_for_every_caller():
    """run_search.py and the duel's recipe count read --backbones and --max-epochs through `narrow`."""
    cpu = get_space("cpu")
    assert narrow(cpu, "", None).backbones == cpu.backbones  # '' = all of the space's
    assert narrow(cpu, f" {cpu.backbones[0]} ,", 3) == Options((cpu.backbones[0],), 3)
    with pytest.raises(UserError, match="--backbones nope not in space 'cpu': choose from"):
        narrow(cpu, f"{cpu.backbones[0]},nope", None)
    tiny = get_space("tiny")
    with pytest.raises(UserError, match="--max-epochs 1 is fewer than space 'tiny' needs"):
        narrow(tiny, "", 1)
    recipe = get_space("resnet50_3stage_224")
    assert narrow(recipe, "", 2).max_epochs == recipe.max_epochs  # a recipe's epochs are its own
