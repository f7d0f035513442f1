"""python benchmarks/step_gap.py [--sizes 32,128] [--strengths 0,1] [--rounds 5] [--profile]: the trial's training steps
(loop.train_epoch) against the model alone (plain and fused SGD), alternating rounds, medians; --profile: top operators."""
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import BACKBONE, alternate, listed, make_bench, md_table, model_fn, parse, parser, rate, split
from trainable.augment import DeviceAugment, policy_for
from trainable.config import TrialConfig
from trainable.loop import train_epoch
from trainable.optim import build_optimizer
from trainable.stages import plan_stages

HEAD = ["size", "aug_strength", "trial img/s", "ceiling img/s", "trial/ceiling (medians)",
        "per-round range", "ceiling with fused SGD img/s", "trial/that"]


def trial_fn(b, size: int, bs: int, steps: int, strength: float):
    """`steps` all-trainable steps of loop.train_epoch with build_optimizer's param groups and schedule (SGD, as the ceiling)."""
    cfg = TrialConfig(backbone=BACKBONE, stage1_epochs=1, stage2_epochs=1000, unfreeze_depth=99,
                      input_size=size, batch_size=bs, aug_strength=strength, optimizer="sgd")
    opt, sched = build_optimizer(b.net, plan_stages(cfg)[1], cfg, 1000 * steps, b.dev)
    aug = DeviceAugment(policy_for(strength, ""), size, b.mean, b.std)
    x, fine, coarse = b.x[:steps * bs], b.fine[:steps * bs], b.coarse[:steps * bs]
    g = torch.Generator(b.dev).manual_seed(0)

    def run() -> int:
        train_epoch(b.net, x, fine, coarse, aug=aug, batch_size=bs, opt=opt, sched=sched, prec=b.prec,
                    scaler=None, mix=None, smoothing=cfg.label_smoothing, coarse_weight=0.0, generator=g)
        return steps * bs
    return run


def print_profile(fn, label: str, rows: int = 18) -> None:
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    print(f"\n### profile: {label}\n\n" + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def measure(a, train, size: int, strength: float) -> list:
    """One table row: the three contenders in alternating rounds, each on a model of its own."""
    bt, bc, bf = (make_bench(train, a.weights_dir) for _ in range(3))
    fns = {"trial": trial_fn(bt, size, a.batch, a.steps, strength), "ceiling": model_fn(bc, size, a.batch, a.steps),
           "ceiling_fused": model_fn(bf, size, a.batch, a.steps, fused=True)}
    times = alternate(fns, a.rounds, a.threads, a.call_seconds, reduce=list)
    r = {k: a.steps * a.batch / statistics.median(v) for k, v in times.items()}
    ratios = sorted(c / t for t, c in zip(times["trial"], times["ceiling"]))
    if a.profile:
        for k, fn in fns.items():
            print_profile(fn, f"{k} at {size} px, aug_strength {strength:g}")
    return [f"{size} px", f"{strength:g}", rate(r["trial"]), rate(r["ceiling"]), f"{r['trial'] / r['ceiling']:.3f}",
            f"{ratios[0]:.3f}-{ratios[-1]:.3f}", rate(r["ceiling_fused"]), f"{r['trial'] / r['ceiling_fused']:.3f}"]


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--sizes", type=listed(int), default="32,128")
    p.add_argument("--strengths", type=listed(float), default="0,1")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="training steps per timed call")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--call-seconds", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--profile", action="store_true")
    a, run = parse(p, "step_gap.py", argv)
    train = split(a, 5).train
    torch.set_num_threads(a.threads)
    rows = []
    for size in a.sizes:
        for strength in a.strengths:
            rows.append(measure(a, train, size, strength))
            print(md_table(HEAD, rows[-1:]), flush=True)
    print("\n" + run.header() + f"\n- {a.rounds} alternating round(s) of torch's Timer (a warm-up call, then >= "
          f"{a.call_seconds:g} s of calls of {a.steps} steps), batch {a.batch}, {a.threads} thread(s), {BACKBONE}, "
          f"median per contender\n\n" + md_table(HEAD, rows))


if __name__ == "__main__":
    main()
