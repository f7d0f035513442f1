"""The best trial's learning-rate schedule per optimiser step, recomputed by the training code's own
stage plan, optimiser and scheduler on an untrained copy of the network; the lr the trial reported
after each epoch is overlaid as a check."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from analysis.experiment import TrialRecord
from report.plots import COLOURS, figure, save
from trainable.config import TrialConfig
from trainable.model import create_model
from trainable.optim import build_optimizer, head_lr
from trainable.stages import plan_stages

FALLBACK_STEPS = 50  # per epoch, when the trial's results don't tell


@dataclass
class Schedule:
    epoch: list[float]  # x of each step, in epochs (step k of epoch e sits at e + k/steps)
    head_lr: list[float]
    lowest_lr: list[float]  # the smallest lr of any trainable group (bottom unfrozen block)
    steps_per_epoch: int
    stage_starts: list[tuple[int, int]]  # (first epoch, stage number)


def steps_per_epoch(trial: TrialRecord) -> int:
    """From the trial's first timed row: images_per_sec * train_seconds = steps * batch_size."""
    cfg = TrialConfig.from_dict(trial.config)
    for r in trial.results:
        ips, secs = r.get("images_per_sec"), r.get("train_seconds")
        if isinstance(ips, (int, float)) and isinstance(secs, (int, float)) and ips > 0:
            return max(1, round(ips * secs / cfg.batch_size))
    return FALLBACK_STEPS


def compute_schedule(config: dict, steps: int) -> Schedule:
    cfg = TrialConfig.from_dict(config)
    net = create_model(cfg.backbone, pretrained=False, head=cfg.head, small_input_stem=cfg.small_input_stem)
    xs, head, low, starts = [], [], [], []
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore", UserWarning)
        for stage in plan_stages(cfg):
            starts.append((stage.first_epoch, stage.number))
            total = stage.epochs * steps
            opt, sched = build_optimizer(net, stage, cfg, total, torch.device("cpu"))
            for k in range(total):
                xs.append(stage.first_epoch + k / steps)
                head.append(head_lr(opt))
                low.append(min(g["lr"] for g in opt.param_groups))
                sched.step()
    return Schedule(xs, head, low, steps, starts)


def _peak(values: list[float], sch: Schedule, first: int) -> float:
    """The largest of `values` in the stage that starts at epoch `first`."""
    later = [f for f, _ in sch.stage_starts if f > first]
    end = later[0] if later else float("inf")
    return max((v for v, x in zip(values, sch.epoch) if first <= x < end), default=0.0)


def plot_schedule(trial: TrialRecord, path: Path) -> Path:
    sch = compute_schedule(trial.config, steps_per_epoch(trial))
    cfg = TrialConfig.from_dict(trial.config)
    fig, ax = figure(10, 4.5)
    ax.plot(sch.epoch, sch.head_lr, color=COLOURS[0], lw=1.8, label="head lr (per step, recomputed)")
    lowest = [b if abs(a - b) > 1e-12 * max(a, 1e-30) else float("nan") for a, b in zip(sch.head_lr, sch.lowest_lr)]
    if any(v == v for v in lowest):  # some step where blocks train slower than the head
        ax.plot(sch.epoch, lowest, color=COLOURS[1], lw=1.4, ls="--",
                label="lowest unfrozen block's lr (layer-wise decay)")
    reported = [(float(r["epoch"]), float(r["lr"])) for r in trial.results
                if "lr" in r and "epoch" in r and float(r["lr"]) > 0]
    if reported:
        ax.scatter(*zip(*reported), color="black", marker="D", s=22, zorder=4,
                   label="lr the trial reported after each epoch (when > 0)")
    # lrs span decades between stages (and blocks, with layer decay): log scale, floor 1/100 of the
    # smallest peak, so a cosine's last steps towards 0 fall off the bottom
    peaks = [_peak(sch.head_lr, sch, first) for first, _ in sch.stage_starts]
    peaks += [_peak(sch.lowest_lr, sch, first) for first, _ in sch.stage_starts]
    top = max(sch.head_lr + [v for _, v in reported] or [1.0])
    floor = min([p for p in peaks if p > 0] or [top]) / 100
    ax.set_yscale("log")
    ax.set_ylim(floor, top * 4)
    for first, number in sch.stage_starts:
        ax.axvline(first, color="#777777", ls=":", lw=1)
        ax.text(first + 0.03, top * 1.3, f"stage {number}: peak {_peak(sch.head_lr, sch, first):.2g}", fontsize=9,
                color="#333333", va="bottom")
    end = sch.epoch[-1] + 1 / sch.steps_per_epoch if sch.epoch else 1
    ax.set_xlim(0, end)
    ax.set_xlabel(f"epoch (global; {sch.steps_per_epoch} optimiser steps per epoch)")
    ax.set_ylabel("learning rate (log scale)")
    ax.set_title(f"Learning-rate schedule of the best trial {trial.trial_id}: {len(sch.stage_starts)} stages, "
                 f"{cfg.schedule}, warmup {cfg.warmup_frac:g} of each stage")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    return save(fig, path)
