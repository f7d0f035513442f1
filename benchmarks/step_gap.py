"""python benchmarks/step_gap.py [--sizes 32,128] [--strengths 0,1] [--rounds 5] [--profile]: the
trial's training steps (loop.train_epoch as a trial calls it: fresh batches sliced, augmented and
laid out, the stage's optimiser over its parameter groups, the per-step schedule) against the
ceiling (common.model_fn: the model alone on one fixed batch, SGD over one group; also with torch's
fused SGD, which the trial now uses), in the same process, alternating rounds, median per contender. `--profile` prints torch.profiler's top
operators of each (self CPU time) to show where the difference goes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    BACKBONE,
    DATA,
    WEIGHTS,
    command_line,
    machine,
    make_bench,
    md_table,
    model_fn,
    per_call,
    rate,
)


HEAD = ["size", "aug_strength", "trial img/s", "ceiling img/s", "trial/ceiling (medians)",
        "per-round range", "ceiling with fused SGD img/s", "trial/that"]


def trial_fn(b, size: int, bs: int, steps: int, strength: float):
    """`steps` of the trial's own all-trainable training steps: loop.train_epoch over steps * bs
    images, with build_optimizer's parameter groups and schedule (SGD, as the ceiling)."""
    from trainable.augment import DeviceAugment, policy_for
    from trainable.config import TrialConfig
    from trainable.loop import train_epoch
    from trainable.optim import build_optimizer
    from trainable.stages import plan_stages
    cfg = TrialConfig(backbone=BACKBONE, stage1_epochs=1, stage2_epochs=1000, unfreeze_depth=99,
                      input_size=size, batch_size=bs, aug_strength=strength, optimizer="sgd")
    stage = plan_stages(cfg)[1]
    opt, sched = build_optimizer(b.net, stage, cfg, 1000 * steps, b.dev)
    aug = DeviceAugment(policy_for(strength, ""), size, b.mean, b.std)
    x, fine, coarse = b.x[:steps * bs], b.fine[:steps * bs], b.coarse[:steps * bs]
    g = torch.Generator(b.dev).manual_seed(0)

    def run() -> int:
        train_epoch(b.net, x, fine, coarse, aug=aug, batch_size=bs, opt=opt, sched=sched, prec=b.prec,
                    scaler=None, mix=None, smoothing=cfg.label_smoothing, coarse_weight=0.0, generator=g)
        return steps * bs
    return run


def profile(fn, label: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    fn()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        fn()
    print(f"\n### profile: {label}\n")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="32,128")
    ap.add_argument("--strengths", default="0,1")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="training steps per timed call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--call-seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--weights-dir", default=str(WEIGHTS))
    a = ap.parse_args(argv)
    from trainable.data import prepare_search_data
    t0 = time.time()
    print(f"- Command: `{command_line('step_gap.py', argv)}`, started "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load {os.getloadavg()[0]:.2f}")
    print(f"- Machine: {machine()}")
    d = prepare_search_data(a.data_dir, subset=5, val_fraction=0.1, seed=0, download=False)
    torch.set_num_threads(a.threads)
    rows = []
    for size in map(int, a.sizes.split(",")):
        for strength in map(float, a.strengths.split(",")):
            bt, bc, bf = (make_bench(d.train, a.weights_dir) for _ in range(3))
            fns = {"trial": trial_fn(bt, size, a.batch, a.steps, strength),
                   "ceiling": model_fn(bc, size, a.batch, a.steps),
                   "ceiling_fused": model_fn(bf, size, a.batch, a.steps, fused=True)}
            times = {k: [] for k in fns}
            for _ in range(a.rounds):
                for k, fn in fns.items():
                    times[k].append(per_call(fn, a.threads, a.call_seconds))
            med = {k: statistics.median(v) for k, v in times.items()}
            r = {k: a.steps * a.batch / v for k, v in med.items()}
            ratios = sorted(c / t for t, c in zip(times["trial"], times["ceiling"]))
            rows.append([f"{size} px", f"{strength:g}", rate(r["trial"]), rate(r["ceiling"]),
                         f"{r['trial'] / r['ceiling']:.3f}", f"{ratios[0]:.3f}-{ratios[-1]:.3f}",
                         rate(r["ceiling_fused"]), f"{r['trial'] / r['ceiling_fused']:.3f}"])
            print(md_table(HEAD, rows[-1:]), flush=True)
            if a.profile:
                torch.set_num_threads(a.threads)
                for k, fn in fns.items():
                    profile(fn, f"{k} at {size} px, aug_strength {strength:g}", 18)
    print(f"\n- {a.rounds} alternating round(s) of torch's Timer (a warm-up call, then >= {a.call_seconds:g} s "
          f"of calls of {a.steps} steps), batch {a.batch}, {a.threads} thread(s), {BACKBONE}, median per "
          f"contender; took {time.time() - t0:.0f} s; load at the end {os.getloadavg()[0]:.2f}\n")
    print(md_table(HEAD, rows))


if __name__ == "__main__":
    main()
