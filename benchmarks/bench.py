"""python benchmarks/bench.py [--quick] [--sections 1,2,...]: is the search spending its compute on the model? One
markdown table of ratios against targets, with notes on how each was measured (for BENCHMARKS.md)."""
import json
import os
import sys
import time
from collections import Counter
from functools import cached_property
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import torch
from PIL import Image
from torchvision import transforms as T

from analysis.experiment import load_trials
from analysis.study import METRIC
from benchmarks.common import (BACKBONE, WEIGHTS, MiB, alternate, fixed_batch, forward_fn, listed, make_bench,
                               md_table, model_fn, parse, parser, per_call, rate, search, split, step, verdict)
from search.searcher import stage_aware_grace
from spaces import get_space
from trainable.augment import DeviceAugment, aug_policy
from trainable.config import TrialConfig
from trainable.loop import batching, coarse_matrix, make_batch, make_mixup
from trainable.model import train_mode
from trainable.optim import build_optimizer
from trainable.stages import plan_stages

FULL = dict(subset=20, overhead_sizes=(32, 128), overhead_batch=64, overhead_epochs=3, ceiling_s=5.0,
            sizes=(32, 96, 224), batch=64, rounds=3, pipe_batches=10, call_s=1.0, dl_rounds=2, dl_batches=10,
            mem_timebox=40.0, mem_control_subset=50, search_samples=12, search_subset=10,
            search_val_fraction=0.2, search_max_epochs=None, search_sets={}, stage_input=96, stage_batch=64)
QUICK = {**FULL, **dict(subset=5, overhead_sizes=(32, 64), overhead_batch=32, overhead_epochs=1, ceiling_s=0.3,
                        batch=16, rounds=1, pipe_batches=4, call_s=0.05, dl_rounds=1, dl_batches=4,
                        mem_timebox=8.0, mem_control_subset=None, search_samples=4, search_subset=2,
                        search_val_fraction=0.5, search_max_epochs=2,
                        search_sets={"input_size": 32, "batch_size": 32}, stage_batch=16)}
HEAD = ["#", "measurement", "ours", "baseline", "ratio", "target", "met"]
MIXUP = (0.8, 1.0, 0.1)  # timm's mixup/cutmix alphas and label smoothing


class Context:
    """What the sections share: the options and scale (`a`), the data and model (built once), the rows and notes."""

    def __init__(self, a):
        self.a, self.rows, self.notes = a, [], {}

    def add(self, *row) -> None:
        self.rows.append(list(row) + ["—"] * (len(HEAD) - len(row)))

    def add_rates(self, section: str, what: str, ours: float, base: float, target="—", ok: bool | None = None, digits=3):
        self.add(section, what, rate(ours) + " img/s", rate(base) + " img/s", f"{ours / base:.{digits}f}", target,
                 "—" if ok is None else verdict(ok))

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(text)

    @cached_property
    def data(self):
        return split(self.a, self.a.subset, seed=self.a.seed)

    @cached_property
    def bench(self):
        return make_bench(self.data.train, self.a.weights_dir)

    def search_opts(self, **opts) -> dict:
        """run_search.py's options for the benchmark's searches (space tiny, lite0, no warm start, FIFO)."""
        return dict(gpus=torch.cuda.device_count(), space="tiny", backbones=BACKBONE, warm_start="none", seed=self.a.seed,
                    weights_dir=self.a.weights_dir or None, no_pretrained=not self.a.weights_dir,
                    **{"max_concurrent": 1, "scheduler": "fifo", **opts})

    def search(self, name: str, watch=None, sets: dict | None = None, **opts) -> tuple[Path, float]:
        print(f"  search {name} ...", flush=True)
        return search(self.a, name, sets, watch=watch, timeout=1800, **self.search_opts(**opts))


def ceiling(ctx: Context, size: int, counts: tuple[int, ...]) -> dict[int, tuple[float, float]]:
    """{threads: (s of an epoch's training steps, of its evaluation)}: the model alone in channels_last on one batch."""
    d, a = ctx.data, ctx.a
    bs, steps = batching(len(d.train), a.overhead_batch)
    b = make_bench(d.train, a.weights_dir, channels_last=True)
    train, eb = model_fn(b, size, bs), min(TrialConfig().eval_batch_size, len(d.val))
    forward, out = forward_fn(b.net, b.prec.prepare(torch.randn(eb, 3, size, size, device=b.dev))), {}
    for t in counts:
        b.net.train()
        t_step = per_call(train, t, a.ceiling_s)
        b.net.eval()
        out[t] = (steps * t_step, per_call(forward, t, a.ceiling_s / 4) * len(d.val) / eb)
    return out


def ceiling_rates(runs: list[dict], images: int) -> dict[int, dict]:
    """Per thread count, averaged over the runs: img/s of the training steps and of the whole epoch, the evaluation s."""
    means = {t: [fmean(r[t][i] for r in runs) for i in (0, 1)] for t in runs[0]}
    return {t: {"train": images / tr, "whole": images / (tr + ev), "eval_s": ev} for t, (tr, ev) in means.items()}


def trial_rates(rows: list[dict]) -> dict:
    """Whole-epoch img/s (Tune's time_this_iter_s), training-steps img/s (the loop's clock), other seconds per epoch."""
    imgs = sum(r["images_per_sec"] * r["train_seconds"] for r in rows)
    wall, train = sum(r["time_this_iter_s"] for r in rows), sum(r["train_seconds"] for r in rows)
    return {"whole": imgs / wall, "train": imgs / train, "other_s": (wall - train) / len(rows)}


def overhead_trial(ctx: Context, size: int, cpus: int) -> tuple[dict, float, float]:
    """One Tune trial, 1 head-only epoch then all-trainable ones: their rates, the search's wall and fixed cost."""
    e2 = ctx.a.overhead_epochs
    sets = {"stage3_epochs": 0, "stage1_epochs": 1, "stage2_epochs": e2, "unfreeze_depth": 99, "input_size": size,
            "batch_size": ctx.a.overhead_batch, "aug_strength": 1.0}
    exp, wall = ctx.search(f"overhead-{size}px-{cpus}cpu", sets=sets, num_samples=1, cpus_per_trial=cpus,
                           subset=ctx.a.subset, max_epochs=1 + e2)
    (trial,) = load_trials(exp)
    rows = [r for r in trial.results if r["epoch"] >= 2]
    if len(rows) != e2:
        raise RuntimeError(f"the overhead trial reported {len(trial.results)} epochs; see {ctx.a.work_dir}/logs")
    return trial_rates(rows), wall, wall - sum(r["time_this_iter_s"] for r in trial.results)


def section_overhead(ctx: Context) -> None:
    a, cpus = ctx.a, ctx.a.overhead_cpus
    counts = tuple(sorted({1, cpus}))  # the ceiling takes the faster of 1 thread and the trial's CPUs
    bs, steps = batching(len(ctx.data.train), a.overhead_batch)
    for i, size in enumerate(a.overhead_sizes):
        before = ceiling(ctx, size, counts)  # the two ceiling runs bracket the trial: their spread is the drift
        tr, wall, fixed = overhead_trial(ctx, size, cpus)
        after = ceiling(ctx, size, counts)
        per, b_, a_ = (ceiling_rates(runs, bs * steps) for runs in ([before, after], [before], [after]))
        t_best = max(per, key=lambda t: per[t]["whole"])
        ce = per[t_best]
        ctx.add_rates("1", f"Trial overhead at {size} px: whole all-trainable epoch, Tune trial ({cpus} CPU(s)) / ceiling "
                           f"(the model alone, channels_last, {t_best} thread(s))", tr["whole"], ce["whole"], "≥ 0.90",
                      tr["whole"] >= 0.9 * ce["whole"])
        ctx.add_rates("1", "  of which the training steps alone (in-loop clock / ceiling's training steps)",
                      tr["train"], ce["train"])
        ctx.note("1", f"{size} px: ceiling whole-epoch rates by thread count: " + "; ".join(
            f"{t} thread(s) {rate(v['whole'])} img/s (before {rate(b_[t]['whole'])}, after {rate(a_[t]['whole'])})"
            for t, v in per.items()) + f". Per epoch besides the training steps: Tune trial {tr['other_s']:.2f} s "
            f"(evaluation + checkpoint + report), ceiling {ce['eval_s']:.2f} s (forward passes only). The search's fixed "
            f"cost (Ray, the worker, the data, the model, shutdown): {fixed:.0f} s of the {wall:.0f} s it took.")
        if i == 0:
            thread_scaling(ctx, size, tr, after, bs * steps)
    ctx.note("1", f"Data: `--subset {a.subset}`: {len(ctx.data.train)} training images ({steps} batches of {bs} an "
                  f"epoch), {len(ctx.data.val)} validation images; {BACKBONE}. Trial: `run_search.py --space tiny "
                  f"--num-samples 1 --cpus-per-trial {cpus}` `--set stage3_epochs=0 stage1_epochs=1 stage2_epochs="
                  f"{a.overhead_epochs} unfreeze_depth=99 aug_strength=1`, its all-trainable epochs timed by Tune's "
                  f"`time_this_iter_s`, in-loop by its `train_seconds`. Ceiling: `bench.ceiling` at "
                  f"{' and '.join(map(str, counts))} thread(s), >= {a.ceiling_s:g} s each, right before and after "
                  f"the trial; the faster thread count is taken.")


def thread_scaling(ctx: Context, size: int, tr: dict, after: dict, images: int) -> None:
    """The trial of section 1 again with the other CPU count (1 if it had more, else 2), and its ceiling."""
    cpus = ctx.a.overhead_cpus
    other = 1 if cpus > 1 else (2 if (os.cpu_count() or 1) >= 2 else None)
    if other is None:
        return
    o_tr, _, _ = overhead_trial(ctx, size, other)
    o_ce = ceiling_rates(([{other: after[other]}] if other in after else []) + [ceiling(ctx, size, (other,))],
                         images)[other]
    (hi, many), (lo, few) = sorted([(cpus, tr), (other, o_tr)], key=lambda p: p[0], reverse=True)
    ctx.add_rates("1", f"Thread scaling at {size} px: whole all-trainable epoch, trial with `--cpus-per-trial "
                       f"{hi}` / `--cpus-per-trial {lo}`", many["whole"], few["whole"], "> 1",
                  many["whole"] > few["whole"], digits=2)
    ctx.add_rates("1", f"  the {other}-CPU trial / ceiling (channels_last, {other} thread(s))", o_tr["whole"], o_ce["whole"])
    ctx.note("1", f"Thread scaling: the {other}-CPU trial ran right after the {cpus}-CPU one's closing ceiling run, "
                  f"then one more {other}-thread ceiling run closed its bracket. In-loop (training steps only): {hi} "
                  f"CPU(s) {rate(many['train'])} img/s, {lo} CPU(s) {rate(few['train'])} img/s.")


def pipeline_fn(b, size: int, bs: int, batches: int):
    """The trial's per-batch data work (loop.make_batch as train_epoch calls it) at aug_strength 1 with mixup."""
    aug, mix = DeviceAugment(aug_policy(1.0), size, b.mean, b.std), make_mixup(*MIXUP)
    f2c, g, mg = coarse_matrix(b.fine, b.coarse), torch.Generator(b.dev).manual_seed(1), torch.Generator().manual_seed(1)
    n = b.x.shape[0]

    def run() -> int:
        perm = torch.randperm(n, device=b.dev, generator=g)
        for i in range(batches):
            make_batch(b.x, b.fine, b.coarse, perm[(i * bs) % (n - bs + 1):][:bs], aug=aug, prec=b.prec, generator=g,
                       mix=mix, fine_to_coarse=f2c, mix_generator=mg)
        return batches * bs
    return run


def section_headroom(ctx: Context) -> None:
    a, b, t = ctx.a, ctx.bench, ctx.a.threads
    for size in a.sizes:
        s = alternate({"pipe": pipeline_fn(b, size, a.batch, a.pipe_batches), "model": model_fn(b, size, a.batch)},
                      a.rounds, t, a.call_s)
        pipe, model = a.pipe_batches * a.batch / s["pipe"], a.batch / s["model"]
        ctx.add_rates("2", f"Pipeline headroom at {size} px: augmentation+mixup / model train step", pipe, model,
                      "≥ 5", pipe >= 5 * model, digits=1)
    ctx.note("2", f"Batch {a.batch}, {t} torch thread(s), {b.dev.type}, {a.rounds} alternating round(s) of >= "
                  f"{a.call_s:g} s; pipeline = `bench.pipeline_fn` ({a.pipe_batches} batches a call), model = "
                  f"`common.model_fn` in the trial's layout.")


class PILSet(torch.utils.data.Dataset):
    """torchvision's CIFAR pattern: HWC uint8 rows, one PIL image per item."""

    def __init__(self, split, transform):
        self.data, self.labels, self.transform = split.images.transpose(0, 2, 3, 1).copy(), split.fine, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), int(self.labels[i])


def dataloader_fn(split, size: int, bs: int, batches: int, workers: int, mean, std, dev):
    """The usual way at strength 1's amplitudes, resized last (PIL's cheapest order); workers start at every call."""
    tf = T.Compose([T.RandomHorizontalFlip(),
                    T.RandomAffine(15, (0.125, 0.125), (0.8, 1.2), interpolation=T.InterpolationMode.BILINEAR),
                    T.ColorJitter(0.4, 0.4, 0.4), T.Resize(size, antialias=True), T.ToTensor(), T.Normalize(mean, std),
                    T.RandomErasing(p=0.25, scale=(0.02, 0.2), value=0)])
    loader = torch.utils.data.DataLoader(PILSet(split, tf), batch_size=bs, shuffle=True, drop_last=True,
                                         num_workers=workers, generator=torch.Generator().manual_seed(2))
    mix = make_mixup(*MIXUP)

    def run() -> int:
        it = iter(loader)
        for _ in range(batches):
            mix(*(v.to(dev) for v in next(it)))
        del it  # shuts the workers down: nothing runs in the background of the next timing
        return batches * bs
    return run


def section_dataloader(ctx: Context) -> None:
    a, b, t, workers = ctx.a, ctx.bench, ctx.a.threads, os.cpu_count() or 1
    for size in a.sizes:
        s = alternate({"ours": pipeline_fn(b, size, a.batch, a.dl_batches),
                       "dl": dataloader_fn(ctx.data.train, size, a.batch, a.dl_batches, workers, b.mean, b.std, b.dev)},
                      a.dl_rounds, t, 0.0)
        ratio, last = s["dl"] / s["ours"], size == max(a.sizes)
        ctx.add("3", f"Against the usual way at {size} px: our pipeline / DataLoader+PIL ({workers} workers)",
                rate(a.dl_batches * a.batch / s["ours"]) + " img/s", rate(a.dl_batches * a.batch / s["dl"]) + " img/s",
                f"{ratio:.2f}×", "≥ 10× at 224" if last else "(info)", verdict(ratio >= 10) if last else "—")
    ctx.note("3", f"`bench.dataloader_fn` (num_workers = {workers}, the cores) against `bench.pipeline_fn` on {t} "
                  f"torch thread(s); batch {a.batch}, {a.dl_batches} batches a call, {a.dl_rounds} alternating round(s).")


class TreeMemory:
    """run_cli's watcher: the search tree's peak memory (psutil); stops it once `workers` workers have lived `timebox` s."""

    def __init__(self, timebox: float, workers: int):
        self.timebox, self.workers, self.seen = timebox, workers, {}
        self.pss = self.rss = self.uss = self.plasma_rss = self.plasma_pss = 0
        self.parts, self.at_peak, self.max_workers, self.samples = {}, 0, 0, 0

    def __call__(self, proc) -> bool:
        try:
            root = psutil.Process(proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:  # the search has just ended
            return False
        tot, parts, workers = {"pss": 0, "rss": 0, "uss": 0}, {"driver": 0, "trial workers": 0, "ray system": 0}, 0
        for p in procs:
            try:
                m, worker = p.memory_full_info(), "ImplicitFunc" in p.name()  # Ray's title of a trial's actor
                plasma = [x for x in p.memory_maps() if "plasma" in x.path] if worker else []
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            for k in tot:
                tot[k] += getattr(m, k)
            parts["driver" if p.pid == root.pid else "trial workers" if worker else "ray system"] += m.pss
            if worker:
                workers += 1
                self.seen.setdefault(p.pid, time.monotonic())
                self.plasma_rss = max(self.plasma_rss, sum(x.rss for x in plasma))
                self.plasma_pss = max(self.plasma_pss, sum(x.pss for x in plasma))
        self.samples, self.max_workers = self.samples + 1, max(self.max_workers, workers)
        self.rss, self.uss = max(self.rss, tot["rss"]), max(self.uss, tot["uss"])
        if tot["pss"] > self.pss:
            self.pss, self.parts, self.at_peak = tot["pss"], parts, workers
        now = time.monotonic()
        return len(self.seen) >= self.workers and all(now - t >= self.timebox for t in self.seen.values())


def section_memory(ctx: Context) -> None:
    a, cpus, d = ctx.a, ctx.a.threads, split(ctx.a, None, seed=ctx.a.seed)
    data_mib = sum(x.nbytes for s in (d.train, d.val) for x in (s.images, s.fine, s.coarse)) / MiB
    n_images = len(d.train) + len(d.val)
    del d
    # every trial stays in stage 1 (head only) for the whole time box, on both datasets
    sets = {"input_size": 16, "batch_size": 256, "stage3_epochs": 0, "stage1_epochs": 50, "stage2_epochs": 1}
    m = {}
    for label, subset in [("full", None)] + ([("control", a.mem_control_subset)] if a.mem_control_subset else []):
        for n in (1, 2):
            m[label, n] = TreeMemory(a.mem_timebox, n)
            ctx.search(f"memory-{label}-{n}", watch=m[label, n], sets=sets, num_samples=n, max_concurrent=n,
                       cpus_per_trial=cpus, subset=subset, max_epochs=51)
            if m[label, n].max_workers < n:
                ctx.note("4", f"WARNING: run {label}/{n} never had {n} trial workers alive at once.")
    f1, f2 = m["full", 1], m["full", 2]
    extra = (f2.pss - f1.pss) / MiB
    ctx.add("4", "Memory: peak PSS of the whole search, 2 concurrent trials vs 1", f"{f2.pss / MiB:,.0f} MiB",
            f"{f1.pss / MiB:,.0f} MiB", f"+{extra:,.0f} MiB = {extra / data_mib:.2f} × dataset", "< 0.33 × dataset",
            verdict(extra < data_mib / 3))
    if ("control", 2) in m:
        c_extra = (m["control", 2].pss - m["control", 1].pss) / MiB
        ctx.add("4", f"  of which due to the data (minus the same pair on a {a.mem_control_subset}/class subset)",
                f"{extra - c_extra:+,.0f} MiB", f"dataset {data_mib:,.0f} MiB",
                f"{(extra - c_extra) / data_mib:.2f} × dataset", "< 0.33 × dataset", verdict(extra - c_extra < data_mib / 3))
        ctx.note("4", f"The control pair (the same searches on `--subset {a.mem_control_subset}`) measures what a "
                      f"second trial's own process costs however the data is shared: +{c_extra:,.0f} MiB.")
    ctx.add("4", "  peak RSS sum, 2 vs 1 (counts shared pages once per process)", f"{f2.rss / MiB:,.0f} MiB",
            f"{f1.rss / MiB:,.0f} MiB", f"+{(f2.rss - f1.rss) / MiB:,.0f} MiB")
    ctx.note("4", f"Dataset: the full training file as train+val, {n_images} images = {data_mib:.1f} MiB. Searches: "
                  f"`run_search.py --num-samples N --max-concurrent N --cpus-per-trial {cpus}` (N = 1, 2) "
                  + " ".join(f"`--set {k}={v}`" for k, v in sets.items()) + ", stopped like a user's Ctrl-C once "
                  f"every trial worker has lived {a.mem_timebox:.0f} s. `bench.TreeMemory`: psutil "
                  f"`memory_full_info()` summed over the search's process tree every second (PSS counts Ray's "
                  f"shared object store once, the RSS sum once per process that touched it). One trial worker had "
                  f"up to {f2.plasma_rss / MiB:.0f} MiB of the object store resident (PSS share "
                  f"{f2.plasma_pss / MiB:.0f} MiB).")
    for (label, n), mm in m.items():
        ctx.note("4", f"{label}, {n} trial(s): peak PSS {mm.pss / MiB:,.0f} MiB ("
                      + ", ".join(f"{k} {v / MiB:,.0f}" for k, v in mm.parts.items())
                      + f" MiB; {mm.at_peak} trial worker(s) alive then), peak RSS sum {mm.rss / MiB:,.0f} MiB, "
                      f"peak USS sum {mm.uss / MiB:,.0f} MiB, {mm.samples} samples.")


def section_search(ctx: Context) -> None:
    o, res = ctx.a, {}
    for sched in ("asha", "fifo"):
        exp, wall = ctx.search(f"search-{sched}", sets=o.search_sets, num_samples=o.search_samples, max_concurrent=2,
                               cpus_per_trial=o.threads, scheduler=sched, subset=o.search_subset,
                               max_epochs=o.search_max_epochs, sampler="random", grace_period=1,
                               val_fraction=o.search_val_fraction)
        trials = load_trials(exp)
        res[sched] = {"wall": wall, "trials": trials, "epochs": sum(t.epochs_run for t in trials),
                      "best": max((t.best[METRIC] for t in trials if t.best), default=float("nan")),
                      "configs": sorted(json.dumps(t.config, sort_keys=True) for t in trials)}
    a, f = res["asha"], res["fifo"]
    ctx.add("5", f"Search: epochs spent, ASHA / FIFO ({o.search_samples} identical configs)", f"{a['epochs']} epochs",
            f"{f['epochs']} epochs", f"{a['epochs'] / f['epochs']:.2f}", "≤ 0.40", verdict(a["epochs"] <= 0.4 * f["epochs"]))
    diff = 100 * (a["best"] - f["best"])
    ctx.add("5", "  best val_acc found", f"{100 * a['best']:.1f} %", f"{100 * f['best']:.1f} %", f"{diff:+.1f} points",
            "within 1 point", verdict(diff >= -1.0))
    ctx.add("5", "  wall time of the whole search", f"{a['wall']:.0f} s", f"{f['wall']:.0f} s", f"{a['wall'] / f['wall']:.2f}")
    grace = stage_aware_grace(get_space("tiny"), o.search_max_epochs or get_space("tiny").max_epochs)
    ctx.note("5", f"`run_search.py --space tiny --backbones {BACKBONE} --warm-start none --sampler random --num-samples "
                  f"{o.search_samples} --max-concurrent 2 --cpus-per-trial {o.threads} --subset "
                  f"{o.search_subset} --val-fraction {o.search_val_fraction} --seed {o.seed}"
                  + "".join(f" --set {k}={v}" for k, v in o.search_sets.items())
                  + (f" --max-epochs {o.search_max_epochs}" if o.search_max_epochs else "")
                  + f"` with `--scheduler asha --grace-period 1` (reduction factor 3; the search's default rung is "
                  f"stage-aware, epoch {grace} here, which benchmarks/rungs.py measures) and with `--scheduler "
                  f"fifo`. Validation: {round(o.search_val_fraction * o.search_subset) * 100} images. Best val_acc = "
                  f"the best epoch of the best trial.")
    ctx.note("5", f"Identical configs: {'yes' if a['configs'] == f['configs'] else 'NO'} "
                  f"({len(set(a['configs']) & set(f['configs']))} of {len(f['configs'])} params.json in both searches): "
                  f"Optuna's own RandomSampler with the seed draws them independently of the results.")
    ctx.note("5", "ASHA trials by epochs run: " + ", ".join(
        f"{n} trial(s) {e} epoch(s)" for e, n in sorted(Counter(t.epochs_run for t in a["trials"]).items()))
        + f"; FIFO ran every trial to the end ({f['epochs']} epochs). Wall times include each search's fixed cost (Ray "
        f"start and shutdown, a worker start and model build per trial).")


def section_stages(ctx: Context) -> None:
    a, b, t = ctx.a, ctx.bench, ctx.a.threads
    cfg = TrialConfig(stage1_epochs=1, stage2_epochs=1, stage3_epochs=1)
    names = ["stage 1 (head only)", f"stage 2 (top {cfg.unfreeze_depth} blocks)", "all trainable"]
    stages, (x, y), state = dict(zip(names, plan_stages(cfg))), fixed_batch(b, a.stage_batch, a.stage_input, seed=3), {}

    def setup(stage):  # untimed: the trial's own optimiser, param groups and train_mode for this stage
        state["opt"], state["sched"] = build_optimizer(b.net, stage, cfg, 10_000, b.dev)
        train_mode(b.net, cfg.freeze_bn)

    def one_step():
        step(b.net, state["opt"], x, y, b.prec, state["sched"])

    # the functional check first, on a clean slate: stage 1 must stop at the head
    b.net.zero_grad(set_to_none=True)
    setup(stages[names[0]])
    bn = [m for m in b.net.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    before = torch.cat([m.running_mean.flatten() for m in bn]).clone()
    one_step()
    grads = sum(p.grad is not None for p in b.net.backbone.parameters())
    n_params = sum(1 for _ in b.net.backbone.parameters())
    moved = not torch.equal(before, torch.cat([m.running_mean.flatten() for m in bn]))
    ms = alternate(dict.fromkeys(names, one_step), a.rounds, t, a.call_s,
                   setups={n: (lambda s=s: setup(s)) for n, s in stages.items()})
    (n1, m1), (n2, m2), (n3, m3) = ((n, 1000 * ms[n]) for n in names)
    ctx.add("6", f"Stage cost at {a.stage_input} px: step time, {n1} / {n2}", f"{m1:,.0f} ms", f"{m2:,.0f} ms", f"{m1 / m2:.2f}")
    ctx.add("6", f"  {n1} / {n3}", f"{m1:,.0f} ms", f"{m3:,.0f} ms", f"{m1 / m3:.2f}")
    ctx.add("6", f"  {n2} / {n3}", f"{m2:,.0f} ms", f"{m3:,.0f} ms", f"{m2 / m3:.2f}")
    ctx.add("6", "  stage 1 backward stops at the head (backbone params with a gradient; BN stats)",
            f"{grads} of {n_params}; {'moved' if moved else 'fixed'}", "—", "—", "0; fixed",
            verdict(grads == 0 and not moved))
    ctx.note("6", f"Batch {a.stage_batch}, {t} thread(s), {a.rounds} alternating round(s); a step on one fixed "
                  f"batch with the stages of `plan_stages` and the trial's `build_optimizer` and `train_mode`. The check: "
                  f"one stage-1 step from a clean slate, backbone gradients and BatchNorm running means after it.")


SECTIONS = {  # number: (title, what it measures, the section)
    "1": ("Trial overhead", "a real trial (run_search.py) vs the model alone, at 32 and 128 px; a 1-CPU vs a 2-CPU trial",
          section_overhead),
    "2": ("Pipeline headroom", "the trial's per-batch data work vs the model's training step", section_headroom),
    "3": ("Against the usual DataLoader", "that data work vs a torchvision DataLoader over PIL images (workers = cores)",
          section_dataloader),
    "4": ("Memory", "whole-search PSS (psutil) with 1 vs 2 concurrent trials on the full file", section_memory),
    "5": ("Search efficiency (ASHA vs FIFO)", "the same seeded random configs under ASHA and FIFO: epochs, wall, best "
          "val_acc", section_search),
    "6": ("Stage cost", "step time of stage 1 (head only) vs stage 2 vs all layers", section_stages)}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, work_dir="", quick="shrink every part (a smoke run)")
    p.add_argument("--sections", type=listed(), default=",".join(SECTIONS), help="comma-separated subset of "
                   + "; ".join(f"{k} {title}: {what}" for k, (title, what, _) in SECTIONS.items()))
    # without the file: random init (''), which runs at the same speed
    p.set_defaults(weights_dir=str(WEIGHTS) if (WEIGHTS / f"{BACKBONE}.pth").is_file() else "")
    p.add_argument("--threads", type=int, default=1, help="torch threads of sections 2, 3, 6; --cpus-per-trial of 4, 5")
    p.add_argument("--overhead-cpus", type=int, default=min(2, os.cpu_count() or 1),
                   help="section 1: the trial's --cpus-per-trial (its ceiling takes the faster of 1 thread and this)")
    p.add_argument("--seed", type=int, default=0)
    a, run = parse(p, "bench.py", argv, FULL, QUICK)
    a.data_dir, a.weights_dir = str(Path(a.data_dir).resolve()), str(Path(a.weights_dir).resolve()) if a.weights_dir else ""
    if set(a.sections) - set(SECTIONS) or not (Path(a.data_dir) / "cifar-100-python").is_dir():
        print("error: sections must be among 1-6 and --data-dir must hold cifar-100-python/", file=sys.stderr)
        return 2
    ctx = Context(a)
    for s in a.sections:
        print(f"[bench] {s}. {SECTIONS[s][0]} ...", flush=True)
        ts = time.time()
        SECTIONS[s][2](ctx)
        ctx.note(s, f"Section time: {time.time() - ts:.0f} s.")
    print("\n" + run.header(" (--quick: a smoke run, not a record)" if a.quick else "")
          + f"\n- Data: `{a.data_dir}`; weights: `{a.weights_dir or 'random init'}`; searches and logs in {a.work_dir}\n\n"
          + md_table(HEAD, ctx.rows))
    for s in a.sections:
        print(f"\n### {s}. {SECTIONS[s][0]}\n\n" + "\n".join(f"- {n}" for n in ctx.notes.get(s, [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
