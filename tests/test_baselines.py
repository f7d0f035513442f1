"""The recipes as fixed configs, and the comparison's parts: epoch scaling, overrides, checks."""
from __future__ import annotations

import re

import pytest
import torch

from analysis.baselines import baseline_configs, comparison_rows, parse_overrides
from spaces import RECIPES, get_space, recipe_config, scale_epochs
from trainable.config import TrialConfig
from trainable.errors import UserError
from trainable.model import create_model
from trainable.stages import block_lr_scales, plan_stages

ISSUE_RECIPES = {"mobilenetv2_2stage_128", "mobilenetv2_2phase_96", "efficientnetv2_frozen", "resnet18_scratch",
                 "vgg13_scratch", "alexnet_scratch", "efficientnetv2s_coarse_fine", "resnet50_3stage_224",
                 "bit_hyperrule", "efficientnetv2_cifar"}  # issue 10's published fine-tunes


def _plan(cfg: dict) -> list[tuple]:
    return [(s.number, s.epochs, s.top_blocks) for s in plan_stages(TrialConfig.from_dict(cfg))]


def test_every_recipe_is_listed_and_fixed():
    assert set(RECIPES) == ISSUE_RECIPES
    for name in RECIPES:
        assert get_space(name).recipe
        assert recipe_config(name) == recipe_config(name)  # nothing sampled


@pytest.mark.parametrize("name", sorted(ISSUE_RECIPES))
def test_every_recipe_builds_and_runs_a_step(name):
    cfg = TrialConfig.from_dict({**recipe_config(name), "pretrained": False})
    net = create_model(cfg.backbone, pretrained=False, head=cfg.head, small_input_stem=cfg.small_input_stem)
    out = net(torch.randn(2, 3, 32, 32))  # 32 px keeps it fast; the recipe's size is checked below
    fine = out[0] if isinstance(out, tuple) else out
    assert fine.shape == (2, 100) and isinstance(out, tuple) == (cfg.head == "coarse_to_fine")


def test_recipes_say_what_the_issue_says():
    mb = recipe_config("mobilenetv2_2phase_96")
    assert _plan(mb) == [(1, 10, 0), (2, 10, 3)] and mb["stage2_lr"] == 1e-5 and mb["input_size"] == 96
    assert mb["augment"].split(",")[0] == "flip" and "rotate" in mb["augment"]
    frozen = recipe_config("efficientnetv2_frozen")
    assert _plan(frozen) == [(1, 30, 0)] and frozen["early_stop_patience"] > 0 and frozen["plateau_patience"] > 0
    for name in ("resnet18_scratch", "vgg13_scratch", "alexnet_scratch"):
        cfg = recipe_config(name)
        assert _plan(cfg) == [(3, 50, None)] and not cfg["pretrained"] and cfg["small_input_stem"]
        assert cfg["input_size"] == 32 and cfg["early_stop_patience"] > 0 and cfg["plateau_patience"] > 0
    cf = recipe_config("efficientnetv2s_coarse_fine")
    assert cf["head"] == "coarse_to_fine" and cf["backbone"] == "tf_efficientnetv2_s"
    assert _plan(cf) == [(2, 20, 3)] and cf["backbone_lr_scale"] < 1  # backbone slower than the heads
    r50 = recipe_config("resnet50_3stage_224")
    assert _plan(r50)[0] == (1, 10, 0) and r50["stage1_lr"] == 1e-2 and r50["batch_size"] == 32
    assert (r50["optimizer"], r50["schedule"], r50["weight_decay"]) == ("sgd", "onecycle", 5e-4)
    assert (r50["mixup_alpha"], r50["cutmix_alpha"], r50["label_smoothing"]) == (0.8, 0.8, 0.1)
    assert r50["early_stop_patience"] == 10
    for op in ("jitter", "grayscale", "flip", "rotate", "translate", "perspective", "blur", "erase"):
        assert op in r50["augment"]


def test_resnet50_recipe_learning_rates():
    cfg = TrialConfig.from_dict(recipe_config("resnet50_3stage_224"))
    s1, s2, s3 = plan_stages(cfg)
    n = len(create_model("resnet50", pretrained=False).blocks())  # stem + 4 layers
    stage2 = [s2.lr * k for k in block_lr_scales(s2, n) if k] + [s2.lr]  # trainable blocks, then head
    assert stage2 == pytest.approx([6e-4, 1e-3, 5e-3])
    stage3 = [s3.lr * k for k in block_lr_scales(s3, n)] + [s3.lr]
    assert stage3[0] == pytest.approx(5.2e-5, rel=0.01) and stage3[-1] == 2e-3
    assert stage3 == sorted(stage3)


# --- scaling, overrides, checks -------------------------------------------------------------------

def test_scale_epochs_shrinks_stages_and_patience_but_keeps_them_on():
    cfg = recipe_config("resnet50_3stage_224")
    small = scale_epochs(cfg, 0.1)
    assert (small["stage1_epochs"], small["stage2_epochs"], small["stage3_epochs"]) == (1, 1, 2)
    assert small["early_stop_patience"] == 1 and small["plateau_patience"] == 0  # off stays off
    assert scale_epochs(recipe_config("efficientnetv2_frozen"), 0.01)["stage2_epochs"] == 0  # skipped stays skipped
    for bad in (0, -1, float("nan")):
        with pytest.raises(UserError, match="epochs-scale"):
            scale_epochs(cfg, bad)


def test_overrides_apply_to_all_or_to_one_recipe():
    o = parse_overrides(["pretrained=false", "alexnet_scratch:input_size=64"], ["alexnet_scratch", "vgg13_scratch"])
    assert o == {"alexnet_scratch": {"pretrained": False, "input_size": 64}, "vgg13_scratch": {"pretrained": False}}
    for bad, fragment in [("pretrained", "is not [RECIPE:]KEY=VALUE"), ("resnet18_scratch:seed=1", "not one of"),
                          ("lr=0.1", "unknown hyper-parameter"), ("input_size=big", "not a valid int")]:
        with pytest.raises(UserError, match=re.escape(fragment)):
            parse_overrides([bad], ["alexnet_scratch", "vgg13_scratch"])


def test_baseline_configs_check_everything_before_training(tmp_path):
    with pytest.raises(UserError, match="choose recipes from"):
        baseline_configs(["tiny"], [], {}, 1.0)  # a search space is not a recipe
    with pytest.raises(UserError, match="no weights file"):  # pretrained, weights folder lacks the file
        baseline_configs(["mobilenetv2_2stage_128"], [], {"weights_dir": str(tmp_path)}, 1.0)
    with pytest.raises(UserError, match="bad trial config"):
        baseline_configs(["alexnet_scratch"], ["input_size=4"], {}, 1.0)
    cfgs = baseline_configs(["mobilenetv2_2stage_128", "alexnet_scratch"], ["pretrained=false"],
                            {"weights_dir": str(tmp_path), "seed": 3}, 0.1)
    assert cfgs["mobilenetv2_2stage_128"]["stage2_epochs"] == 2 and cfgs["alexnet_scratch"]["seed"] == 3


def test_comparison_puts_the_search_best_first():
    cfg = recipe_config("alexnet_scratch")
    m = {"test_acc": 0.5, "test_coarse_acc": 0.6, "epochs": 3, "train_images": 10, "train_seconds": 1.0}
    rows = comparison_rows({"trial_id": "abc", "config": cfg, "metrics": m},
                           {"alexnet_scratch": {"config": cfg, "metrics": {"error": "boom"}}})
    assert [r["recipe"] for r in rows] == ["search best (trial abc)", "alexnet_scratch"]
    assert rows[0]["planned_epochs"] == 50 and rows[1]["error"] == "boom"
