"""The stage plan: a pure function from a TrialConfig to its fine-tuning stages.

Stage 1 trains the head, stage 2 the top `unfreeze_depth` blocks too, stage 3 everything; a stage with 0
epochs is skipped. The top trainable block's lr is `backbone_lr_scale` x the head's, each block below
`layer_decay` x the one above.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainable.config import TrialConfig


@dataclass(frozen=True)
class Stage:
    number: int  # 1, 2 or 3 (kept when an earlier stage is skipped)
    first_epoch: int  # global epoch (0-based) at which this stage starts, if no stage ends early
    epochs: int
    lr: float  # the head's learning rate; blocks get lr * block_lr_scales()
    top_blocks: int | None  # trainable backbone blocks from the top: 0 = head only, None = all
    layer_decay: float = 1.0  # lr ratio between a block and the one above it
    backbone_scale: float = 1.0  # lr ratio between the top block and the head


def plan_stages(cfg: TrialConfig) -> list[Stage]:
    spec = [(cfg.stage1_epochs, cfg.stage1_lr, 0), (cfg.stage2_epochs, cfg.stage2_lr, cfg.unfreeze_depth),
            (cfg.stage3_epochs, cfg.stage3_lr, None)]
    plan, start = [], 0
    for number, (epochs, lr, top) in enumerate(spec, start=1):
        if epochs > 0:
            plan.append(Stage(number, start, epochs, lr, top, cfg.layer_decay, cfg.backbone_lr_scale))
            start += epochs
    return plan


def block_lr_scales(stage: Stage, n_blocks: int) -> list[float]:
    """Per-block lr multiplier, bottom block first; 0.0 = frozen in this stage."""
    top = n_blocks if stage.top_blocks is None else min(stage.top_blocks, n_blocks)
    return [0.0 if i < n_blocks - top else stage.backbone_scale * stage.layer_decay ** (n_blocks - 1 - i)
            for i in range(n_blocks)]


STEP_MILESTONES = (0.3, 0.6, 0.9)  # BiT-HyperRule: lr x0.1 at 30, 60 and 90 % of training (Kolesnikov et al. 2020)
