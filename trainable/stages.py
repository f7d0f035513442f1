"""The stage plan: a pure function from a TrialConfig to the list of fine-tuning stages.

Stage 1 trains the head only (backbone frozen), stage 2 the top `unfreeze_depth` blocks plus the
head, optional stage 3 the whole network with layer-wise learning-rate decay (the top block gets
stage3_lr, each block below it `layer_decay` times the one above; the head gets stage3_lr).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from trainable.config import TrialConfig


@dataclass(frozen=True)
class Stage:
    number: int  # 1, 2 or 3
    first_epoch: int  # global epoch (0-based) at which this stage starts
    epochs: int
    lr: float  # the head's learning rate; blocks get lr * block_lr_scale
    top_blocks: int | None  # trainable backbone blocks from the top: 0 = head only, None = all
    layer_decay: float = 1.0  # lr ratio between a block and the one above it


def plan_stages(cfg: TrialConfig) -> list[Stage]:
    spec = [(cfg.stage1_epochs, cfg.stage1_lr, 0, 1.0),
            (cfg.stage2_epochs, cfg.stage2_lr, cfg.unfreeze_depth, 1.0)]
    if cfg.stages == 3:
        spec.append((cfg.stage3_epochs, cfg.stage3_lr, None, cfg.layer_decay))
    plan, start = [], 0
    for number, (epochs, lr, top, decay) in enumerate(spec, start=1):
        plan.append(Stage(number, start, epochs, lr, top, decay))
        start += epochs
    return plan


def stage_at(plan: list[Stage], epoch: int) -> Stage:
    """The stage that global epoch `epoch` (0-based) belongs to."""
    for s in plan:
        if s.first_epoch <= epoch < s.first_epoch + s.epochs:
            return s
    raise IndexError(f"epoch {epoch} is past the plan's {plan[-1].first_epoch + plan[-1].epochs} epochs")


def block_lr_scales(stage: Stage, n_blocks: int) -> list[float]:
    """Per-block lr multiplier, bottom block first; 0.0 = frozen in this stage."""
    top = n_blocks if stage.top_blocks is None else min(stage.top_blocks, n_blocks)
    return [0.0 if i < n_blocks - top else stage.layer_decay ** (n_blocks - 1 - i)
            for i in range(n_blocks)]


def lr_factor(step: int, total_steps: int, warmup_frac: float) -> float:
    """Linear warmup then cosine decay to 0, as a multiple of the stage's peak lr."""
    warmup = int(total_steps * warmup_frac)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
