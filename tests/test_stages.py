"""Tests for trainable/stages.py: the stage plan, per-block lr scales and the per-step lr factor."""
from __future__ import annotations

import pytest

from trainable.config import TrialConfig
from trainable.errors import UserError
from trainable.stages import Stage, block_lr_scales, plan_stages


def _cfg(**kw) -> TrialConfig:
    return TrialConfig.from_dict(kw)


TWO = dict(unfreeze_depth=3, stage1_epochs=2, stage1_lr=0.01, stage2_epochs=5, stage2_lr=0.002)
THREE = dict(TWO, stage3_epochs=4, stage3_lr=0.0005, layer_decay=0.5)


# --- plan_stages ---------------------------------------------------------------------------------

def test_plan_two_stages():
    plan = plan_stages(_cfg(**TWO, layer_decay=0.8, backbone_lr_scale=0.5))
    assert plan == [Stage(1, 0, 2, 0.01, 0, 0.8, 0.5), Stage(2, 2, 5, 0.002, 3, 0.8, 0.5)]


def test_the_plan_is_the_stage_epochs_alone():
    assert len(plan_stages(_cfg(**TWO, stage3_lr=0.5, layer_decay=0.3))) == 2  # stage 3's lr, no epochs: no stage 3
    plan = plan_stages(_cfg(**TWO, stage3_epochs=9))
    assert [s.number for s in plan] == [1, 2, 3] and plan[-1].first_epoch + plan[-1].epochs == 16


def test_plan_three_stages():
    plan = plan_stages(_cfg(**THREE))
    assert [s.number for s in plan] == [1, 2, 3]
    assert [s.first_epoch for s in plan] == [0, 2, 7]
    assert [s.epochs for s in plan] == [2, 5, 4]
    assert [s.lr for s in plan] == [0.01, 0.002, 0.0005]
    assert [s.top_blocks for s in plan] == [0, 3, None]  # head only, top 3, everything
    assert [s.layer_decay for s in plan] == [0.5, 0.5, 0.5]  # stage 1 has no blocks to decay
    assert plan[-1].first_epoch + plan[-1].epochs == _cfg(**THREE).total_epochs == 11


# --- block_lr_scales -----------------------------------------------------------------------------

def test_head_only_stage_freezes_every_block():
    assert block_lr_scales(Stage(1, 0, 1, 0.1, 0), 5) == [0.0] * 5


@pytest.mark.parametrize("depth, expected", [
    (1, [0.0, 0.0, 0.0, 0.0, 1.0]),
    (2, [0.0, 0.0, 0.0, 1.0, 1.0]),
    (4, [0.0, 1.0, 1.0, 1.0, 1.0]),
    (5, [1.0] * 5),
    (9, [1.0] * 5),  # deeper than the network: clipped to all blocks
])
def test_stage2_trains_top_k_blocks(depth, expected):
    assert block_lr_scales(Stage(2, 1, 1, 0.1, depth), 5) == expected


def test_stage3_geometric_decay_from_the_top():
    scales = block_lr_scales(Stage(3, 3, 1, 0.1, None, layer_decay=0.5), 4)
    assert scales == pytest.approx([0.125, 0.25, 0.5, 1.0])  # bottom block first


def test_stage3_without_decay_is_uniform():
    assert block_lr_scales(Stage(3, 3, 1, 0.1, None, layer_decay=1.0), 3) == [1.0, 1.0, 1.0]


def test_block_scales_from_a_real_plan():
    plan = plan_stages(_cfg(**dict(THREE, unfreeze_depth=2, layer_decay=0.75)))
    assert block_lr_scales(plan[0], 4) == [0.0] * 4
    assert block_lr_scales(plan[1], 4) == pytest.approx([0.0, 0.0, 0.75, 1.0])  # discriminative in stage 2 too
    assert block_lr_scales(plan[2], 4) == pytest.approx([0.75 ** 3, 0.75 ** 2, 0.75, 1.0])


def test_backbone_lr_scale_sets_the_top_block_relative_to_the_head():
    # the ResNet-50 recipe's stage 2: head 5e-3, layer4 1e-3, layer3 6e-4 (5 blocks, top 2 trainable)
    stage = Stage(2, 0, 1, 5e-3, 2, layer_decay=0.6, backbone_scale=0.2)
    lrs = [s * stage.lr for s in block_lr_scales(stage, 5)]
    assert lrs == pytest.approx([0.0, 0.0, 0.0, 6e-4, 1e-3])


# --- skipped stages ------------------------------------------------------------------------------

def test_a_stage_with_no_epochs_is_skipped():
    frozen = plan_stages(_cfg(stage1_epochs=4, stage2_epochs=0))  # a frozen feature extractor
    assert [(s.number, s.first_epoch, s.epochs, s.top_blocks) for s in frozen] == [(1, 0, 4, 0)]
    scratch = plan_stages(_cfg(stage1_epochs=0, stage2_epochs=0, stage3_epochs=6))
    assert [(s.number, s.first_epoch, s.epochs, s.top_blocks) for s in scratch] == [(3, 0, 6, None)]
    no_head_stage = plan_stages(_cfg(stage1_epochs=0, stage2_epochs=3, unfreeze_depth=2))
    assert [(s.number, s.first_epoch) for s in no_head_stage] == [(2, 0)]


def test_a_plan_needs_some_epochs():
    with pytest.raises(UserError, match="no epochs"):
        _cfg(stage1_epochs=0, stage2_epochs=0)
    with pytest.raises(UserError, match=">= 0"):
        _cfg(stage1_epochs=-1)
