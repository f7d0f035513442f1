"""planning/precheck.py: every config a search can hand a trial is checked before Ray starts, a
space with nothing left to sample runs once (or as seeded repeats), and every trial's epochs equal
ASHA's max_t."""
from __future__ import annotations

import json

import pytest

from planning.precheck import RepeatSeeds, budget_problem, plan_search
from planning.settings import SearchSettings
from spaces import Options, Space, Suggest, get_space
from tests.conftest import run_cli
from trainable.config import TrialConfig
from trainable.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"pretrained": False, "weights_dir": "", "seed": 0, "compile": False}



def _plan(space: str, *sets: str, max_epochs: int | None = None, num_samples: int | None = None,
          backbones: tuple[str, ...] | None = None, seed: int = 0):
    """plan_search as search/run.py calls it (opts as resolve_space builds them)."""
    sp = get_space(space)
    s = SearchSettings(space=space, set=list(sets), max_epochs=max_epochs, num_samples=num_samples, seed=seed)
    opts = Options(backbones or sp.backbones, sp.max_epochs if max_epochs is None or sp.recipe else max_epochs)
    return plan_search(s, sp, opts, s.fixed(), {**BASE, "seed": seed})


def _error(*args, **kw) -> str:
    with pytest.raises(UserError) as e:
        _plan(*args, **kw)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# --- combinations that would fail inside every trial ----------------------------------------------

@pytest.mark.parametrize("space, sets, words", [
    # timm Mixup asserts an even batch
    ("tiny", ["batch_size=33", "mixup_alpha=0.2"], ["even batch_size", "use 32 or 34, not 33"]),
    ("tiny", ["batch_size=7", "cutmix_alpha=1.0"], ["even batch_size", "not 7"]),
    # an odd batch against a space that samples mixup/cutmix itself
    ("default", ["batch_size=33"], ["even batch_size", "not 33"]),
    ("cpu", ["batch_size=65"], ["even batch_size", "not 65"]),
    # a batch of one can't train BatchNorm at a 1x1 feature map
    ("tiny", ["batch_size=1"], ["batch_size 1", "2 or more"]),
    # a network that shrinks the image to nothing
    ("vgg13_scratch", ["input_size=16"], ["input_size 16", "vgg13_bn", "input_size >= 32"]),
    ("vgg13_scratch", ["input_size=24"], ["input_size 24", "input_size >= 32"]),
    # a stem swap the backbone has no form for
    ("tiny", ["small_input_stem=true"], ["small_input_stem", "tf_efficientnet_lite0"]),
])
def test_configs_that_fail_in_a_trial_fail_here(space, sets, words):
    msg = _error(space, *sets)
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("space, sets, backbones", [
    ("tiny", ["batch_size=33"], None),  # odd without mixup trains
    ("tiny", ["batch_size=34", "mixup_alpha=0.2"], None),
    ("tiny", ["eval_batch_size=3"], None),  # evaluation: no mixup, BatchNorm in eval mode
    ("tiny", ["input_size=16"], None),  # these backbones shrink 16 px to 1x1, not to nothing
    ("tiny", ["input_size=33"], None),
    ("tiny", ["unfreeze_depth=50"], ("resnet18",)),  # more blocks than resnet18 has: all of them train
    ("resnet18_scratch", ["input_size=16"], None),
    ("alexnet_scratch", ["input_size=16"], None),
])
def test_combinations_that_train_are_accepted(space, sets, backbones):
    plan = _plan(space, *sets, backbones=backbones)
    assert plan.configs and all(TrialConfig.from_dict(c) for c in plan.configs)


# --- stage epochs against the per-trial budget (ASHA's max_t) -------------------------------------

@pytest.mark.parametrize("sets, max_epochs, words", [
    # a stage 1 that leaves a 3-stage plan no stage 2, or none at all
    (["stage1_epochs=3"], 4, ["stage 2 0 epochs", "--set stage3_epochs=0", "--max-epochs 5"]),
    (["stage1_epochs=6"], 4, ["stage 2 -3 epochs", "--max-epochs 8"]),
    # stage epochs that add up to more than the budget (ASHA would cut every trial short)
    (["stage2_epochs=5"], 4, ["makes a trial", "ASHA's max_t", "drop --set stage2_epochs"]),
    (["stage3_epochs=0", "stage1_epochs=1", "stage2_epochs=5"], 4, ["makes a trial 6 epochs", "--max-epochs 6"]),
    # ... or to less
    (["stage1_epochs=0", "stage2_epochs=0"], 4, ["stage1 0 + stage2 0 + stage3 2", "every trial gets 4"]),
    (["stage3_epochs=1"], 2, ["stage 2 0 epochs", "--max-epochs 3"]),
    (["stage3_epochs=5"], 4, ["stage 2 -2 epochs", "--max-epochs 7"]),
])
def test_impossible_budgets(sets, max_epochs, words):
    msg = _error("tiny", *sets, max_epochs=max_epochs)
    for w in words:
        assert w in msg, msg


def test_every_config_fills_the_budget():
    for sets, max_epochs in [([], None), (["stage1_epochs=3"], 5), (["stage3_epochs=0", "stage1_epochs=3"], 4),
                             (["stage3_epochs=1"], 3), (["stage1_epochs=0", "stage3_epochs=0"], 4)]:
        plan = _plan("tiny", *sets, max_epochs=max_epochs)
        assert {TrialConfig.from_dict(c).total_epochs for c in plan.configs} == {plan.opts.max_epochs}


def test_a_stage_the_space_leaves_out_itself_is_fine():
    """The cpu space's plans include a frozen feature extractor (stage 1 alone) and stage 3 alone:
    a 0-epoch stage there is the space's own choice, not a squeezed budget."""
    plan = _plan("cpu", max_epochs=4)
    totals = {TrialConfig.from_dict(c).total_epochs for c in plan.configs}
    assert totals == {4}
    assert any(c["stage2_epochs"] == 0 for c in plan.configs)


def test_budget_problem_names_the_cause():
    tiny, cpu = get_space("tiny"), get_space("cpu")
    squeezed = {"stage1_epochs": 2, "stage3_epochs": 2}
    problem = budget_problem(tiny, Options(tiny.backbones, 4), squeezed)
    assert problem.startswith("--set stage1_epochs=2, stage3_epochs=2 leaves stage 2 0 epochs"), problem
    assert budget_problem(tiny, Options(tiny.backbones, 4), {**squeezed, "stage2_epochs": 0}) == ""  # the user's 0
    assert budget_problem(cpu, Options(cpu.backbones, 4), {}) == ""  # a space that skips stage 2 itself
    short = Space("short", "", ("resnet18",), 4, 2, sample=lambda s, o: {"stage1_epochs": 1, "stage2_epochs": 2})
    assert budget_problem(short, Options(short.backbones, 4), {}) == (
        "space 'short' makes a trial 3 epochs (stage1 1 + stage2 2) but every trial gets 4 (ASHA's max_t)")


def test_recipe_budget_is_its_own_epochs():
    assert _plan("mobilenetv2_2stage_128").opts.max_epochs == 20
    assert _plan("mobilenetv2_2stage_128", "stage2_epochs=5").opts.max_epochs == 10  # ASHA's max_t follows
    assert _plan("mobilenetv2_2stage_128", max_epochs=20).opts.max_epochs == 20
    msg = _error("mobilenetv2_2stage_128", max_epochs=30)
    assert "--max-epochs 30" in msg and "20 epochs" in msg
    msg = _error("mobilenetv2_2stage_128", max_epochs=4)
    assert "--max-epochs 4" in msg and "20 epochs" in msg


# --- a space with nothing left to sample ----------------------------------------------------------

@pytest.mark.parametrize("space, sets, backbones", [
    ("mobilenetv2_2stage_128", [], None),  # a fixed recipe
    ("resnet50_3stage_224", [], None),
    ("faults", ["stage1_lr=0.01", "freeze_bn=false"], ("resnet18",)),  # a search space that --set fixes entirely
])
def test_nothing_to_sample_runs_once_and_says_so(space, sets, backbones):
    plan = _plan(space, *sets, backbones=backbones)
    assert plan.num_samples == 1 and len(plan.configs) == 1
    assert "nothing left to sample" in plan.note and "running it once" in plan.note
    assert "--num-samples N runs N repeats" in plan.note
    assert not isinstance(plan.space.sample, RepeatSeeds)
    once = _plan(space, *sets, backbones=backbones, num_samples=1)
    assert once.num_samples == 1 and "running it once" in once.note and "repeats" not in once.note


def test_a_search_space_keeps_the_users_num_samples():
    assert _plan("tiny").num_samples is None  # search/run.py's default decides
    assert _plan("tiny", num_samples=5).num_samples == 5
    assert _plan("faults", "stage1_lr=0.01", "freeze_bn=false").num_samples is None  # the backbone is still sampled
    assert _plan("tiny").note == ""


def test_repeats_get_consecutive_seeds():
    plan = _plan("mobilenetv2_2stage_128", num_samples=3, seed=7)
    assert plan.num_samples == 3 and "running 3 repeats with seeds 7..9" in plan.note
    import optuna
    study = optuna.create_study()
    seeds = [plan.space.sample(Suggest(study.ask(), {}), plan.opts)["seed"] for _ in range(3)]
    assert seeds == [7, 8, 9]
    assert "--seed" in _error("mobilenetv2_2stage_128", "seed=4", num_samples=3)


def test_recipe_repeats_through_the_cli(tmp_path, data_dir):
    """The repeats run for real through Ray Tune's OptunaSearch (which pickles the wrapped space):
    two trials of one recipe, seeds 3 and 4, and the console says so."""
    proc = run_cli("run_search.py", "--space", "mobilenetv2_2stage_128", "--num-samples", 2, "--seed", 3,
                   "--set", "stage1_epochs=1", "--set", "stage2_epochs=1", "--set", "input_size=32",
                   "--subset", 3, "--gpus", 0, "--no-pretrained", "--data-dir", data_dir,
                   "--storage-path", tmp_path, "--name", "rep", check=True, timeout=600)
    assert "running 2 repeats with seeds 3..4" in proc.stdout
    configs = [json.loads(p.read_text()) for p in sorted((tmp_path / "rep").glob("*/params.json"))]
    assert sorted(c["seed"] for c in configs) == [3, 4]
    assert all(c["stage1_epochs"] + c["stage2_epochs"] == 2 for c in configs)
