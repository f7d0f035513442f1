"""Optimiser and learning-rate schedule for one stage, built from the stage plan.

timm's create_optimizer_v2 applies layer decay as an `lr_scale` only timm's schedulers read, and those
have no OneCycle: the groups here carry their lrs, for torch's schedulers.
"""
from __future__ import annotations

import math

import torch
from timm.optim import RMSpropTF
from torch import nn
from torch.optim import lr_scheduler as S

from trainable.config import TrialConfig
from trainable.model import Net, set_trainable
from trainable.stages import STEP_MILESTONES, Stage, block_lr_scales


def param_groups(net: Net, stage: Stage, weight_decay: float) -> list[dict]:
    """One group per (block, decay/no-decay) with its lr, frozen blocks left out; biases and norm weights
    (1-D tensors) get no weight decay, as in timm and most recipes."""
    set_trainable(net, stage.top_blocks)
    blocks = net.blocks()
    scaled = [(p_list, s * stage.lr) for p_list, s in zip(blocks, block_lr_scales(stage, len(blocks)))]
    scaled.append((net.head_parameters(), stage.lr))
    groups = []
    for params, lr in scaled:
        if lr == 0.0:
            continue
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [{"params": ps, "lr": lr, "weight_decay": wd}
                   for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    return groups


def build_optimizer(net: Net, stage: Stage, cfg: TrialConfig, steps: int, device: torch.device
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser over this stage's trainable parameters, and its per-step schedule."""
    groups = param_groups(net, stage, cfg.weight_decay)
    # one fused kernel over every tensor instead of torch's per-tensor Python loop, the CPU default:
    # SGD's step over lite0's ~18 groups takes 8 ms fused against 22 ms (benchmarks/step_gap.py)
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=stage.lr, momentum=0.9, nesterov=True, **fused)
    elif cfg.optimizer == "rmsprop":
        # TensorFlow's RMSProp as EfficientNet(V2) trained with it (decay 0.9, momentum 0.9, eps 1e-3);
        # torch's RMSprop puts eps outside the sqrt and behaves differently at these settings
        opt = RMSpropTF(groups, lr=stage.lr, alpha=0.9, momentum=0.9, eps=1e-3, foreach=True)  # it has no fused kernel
    else:
        opt = torch.optim.AdamW(groups, lr=stage.lr, **fused)
    return opt, build_schedule(opt, cfg, steps)


def build_schedule(opt: torch.optim.Optimizer, cfg: TrialConfig, steps: int
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """The stage's per-step lr schedule: a warm-up LinearLR from lr/w to lr over w steps, then CosineAnnealingLR
    to 0, MultiStepLR x0.1 at STEP_MILESTONES, or the lr held (plateau cuts stay: LinearLR is chainable);
    or OneCycleLR, whose rise from max_lr/25 over pct_start = warmup_frac is its own warm-up."""
    total = max(1, steps)
    if cfg.schedule == "onecycle":
        pct = max(cfg.warmup_frac, 0.01)
        if math.isclose(pct * total, 1.0):  # OneCycleLR divides 0 by 0 when its peak is step 0
            pct /= 2  # peak "at step -0.5": the same no-warmup start as any pct * total < 1
        return S.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total,
                            pct_start=pct, cycle_momentum=cfg.optimizer == "sgd")
    w = int(total * cfg.warmup_frac)
    w = w if w > 1 else 0  # one warm-up step would start at the peak anyway
    main = {"cosine": lambda: S.CosineAnnealingLR(opt, T_max=max(1, total - w)),
            "step": lambda: S.MultiStepLR(opt, [math.ceil(m * total) - w for m in STEP_MILESTONES], 0.1),
            "constant": lambda: None}[cfg.schedule]()
    if not w:
        return main or S.ConstantLR(opt, factor=1.0, total_iters=0)
    warm = S.LinearLR(opt, start_factor=1 / w, total_iters=w - 1)
    return warm if main is None else S.SequentialLR(opt, [warm, main], milestones=[w])


def build_plateau(opt: torch.optim.Optimizer, cfg: TrialConfig
                  ) -> torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """Cut every group's lr by plateau_factor after plateau_patience epochs without a lower
    val_loss (Keras's counting; torch's `patience` allows that many bad epochs *before* the cut)."""
    if cfg.plateau_patience <= 0:
        return None
    return S.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience - 1)


def cut_lr(opt: torch.optim.Optimizer, factor: float, eps: float = 1e-8) -> None:
    """Every group's lr times `factor`, as ReduceLROnPlateau cuts it (a change of at most its eps is skipped):
    a retrain replays the cuts its search trial's plateau made (trainable.trial.Replay)."""
    for g in opt.param_groups:
        if g["lr"] - g["lr"] * factor > eps:
            g["lr"] = g["lr"] * factor


def head_lr(opt: torch.optim.Optimizer) -> float:
    """The current lr of the head (the last group added), for reporting."""
    return float(opt.param_groups[-1]["lr"])


def count_trainable(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
