"""python benchmarks/bench.py [--quick] [--out BENCHMARKS.md]: is the search spending its compute
on the model? One run measures, side by side, and prints one table of ratios:

  1. trial overhead      a real trial through Ray Tune vs the machine's ceiling (the model-only
                         loop in the fastest layout and thread count), 32 and 128 px; and a
                         1-CPU vs a 2-CPU trial
  2. pipeline headroom   on-device augmentation alone vs the model's training step, 32/96/224 px
  3. vs the usual way    our pipeline vs a torchvision DataLoader over PIL images (workers = cores)
  4. memory              whole-search PSS with 1 vs 2 concurrent trials on the full training file
  5. search efficiency   the same 12 configs under ASHA and FIFO: epochs, wall, best val_acc
  6. stage cost          step time of stage 1 (head only) vs stage 2 vs all layers

Runs on the CPU here (and on the GPU where there is one). --quick shrinks every part (~3 min).
The full run writes BENCHMARKS.md (the generated block only: text outside the
<!-- bench:begin/end --> markers is kept). Absolute numbers vary between runs on a shared
machine; ratios of contenders timed in alternation are the figures to read.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import searches  # noqa: E402
from benchmarks.searches import MiB  # noqa: E402
from benchmarks.markdown import replace_block  # noqa: E402

SHARED = REPO.parent / "shared"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
SECTIONS = ("1", "2", "3", "4", "5", "6")


@dataclass(frozen=True)
class Scale:
    """Every size the benchmark uses; FULL for the record, QUICK to check it runs."""
    # 1. trial overhead
    overhead_subset: int  # images per class (the split leaves 90 % for training)
    overhead_sizes: tuple[int, ...]  # input sizes (px), one trial and one ceiling bracket each
    overhead_batch: int
    overhead_stage2_epochs: int  # epochs timed (all layers trainable); stage 1 runs before
    bare_epochs_each_side: dict  # input size -> ceiling epochs per thread count, before and after
    # 2/3. pipelines
    sizes: tuple[int, ...]
    batch: int
    headroom_rounds: dict  # input size -> rounds
    pipe_batches: int  # batches per pipeline call
    dl_batches: int  # batches per DataLoader call (a fresh iterator each)
    dl_rounds: int
    # 4. memory
    mem_input: int
    mem_batch: int
    mem_timebox: float  # s each trial worker lives before the search is stopped
    mem_control_subset: int | None  # None: skip the control runs
    # 5. ASHA vs FIFO
    search_samples: int
    search_subset: int
    search_val_fraction: float
    search_max_epochs: int | None  # None: the tiny space's own budget (4)
    search_sets: dict
    # 6. stage cost
    stage_input: int
    stage_batch: int
    stage_rounds: int


FULL = Scale(overhead_subset=20, overhead_sizes=(32, 128), overhead_batch=64, overhead_stage2_epochs=3,
             bare_epochs_each_side={32: 2, 128: 1},
             sizes=(32, 96, 224), batch=64, headroom_rounds={32: 3, 96: 3, 224: 2}, pipe_batches=10,
             dl_batches=10, dl_rounds=2,
             mem_input=16, mem_batch=256, mem_timebox=40.0, mem_control_subset=50,
             search_samples=12, search_subset=10, search_val_fraction=0.2, search_max_epochs=None,
             search_sets={},
             stage_input=96, stage_batch=64, stage_rounds=3)
QUICK = Scale(overhead_subset=5, overhead_sizes=(32, 64), overhead_batch=32, overhead_stage2_epochs=1,
              bare_epochs_each_side={32: 1, 64: 1},
              sizes=(32, 96, 224), batch=16, headroom_rounds={32: 2, 96: 2, 224: 1}, pipe_batches=4,
              dl_batches=4, dl_rounds=1,
              mem_input=16, mem_batch=256, mem_timebox=8.0, mem_control_subset=None,
              search_samples=4, search_subset=2, search_val_fraction=0.5, search_max_epochs=2,
              search_sets={"input_size": 32, "batch_size": 32},
              stage_input=96, stage_batch=16, stage_rounds=2)


@dataclass
class Row:
    section: str
    what: str
    ours: str
    baseline: str
    ratio: str
    target: str = "—"
    met: str = "—"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, list[str]] = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    def add(self, *a, **k) -> None:
        self.rows.append(Row(*a, **k))

    def note(self, section: str, text: str) -> None:
        self.details.setdefault(section, []).append(text)


def verdict(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def rate(v: float) -> str:
    return f"{v:,.0f} img/s" if v >= 100 else f"{v:.1f} img/s"


# ----------------------------------------------------------------------------- the sections


class Context:
    def __init__(self, args, scale: Scale, work: Path):
        import torch
        self.args, self.scale, self.work = args, scale, work
        self.cores = os.cpu_count() or 1
        self.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.data_dir = str(Path(args.data_dir).resolve())
        self.weights_dir = str(Path(args.weights_dir).resolve()) if args.weights_dir else ""
        self._bench = None
        self._data = None

    def data(self):
        """The overhead run's train/val split, also the images of the in-process measurements."""
        if self._data is None:
            from trainable.data import prepare_search_data
            self._data = prepare_search_data(self.data_dir, subset=self.scale.overhead_subset,
                                             val_fraction=0.1, seed=self.args.seed, download=False)
        return self._data

    def bench(self):
        if self._bench is None:
            from benchmarks.micro import make_bench
            self._bench = make_bench(self.data().train, self.weights_dir)
        return self._bench

    def search(self, name: str, *, samples: int, concurrent: int, scheduler: str = "fifo",
               subset: int | None, max_epochs: int | None, sets: dict, extra: list[str] = (),
               total: int | None = None, cpus: int | None = None, **kw) -> searches.SearchRun:
        """A whole search through run_search.py; `cpus` per trial defaults to --threads."""
        from tqdm import tqdm
        args = searches.search_args(
            data_dir=self.data_dir, weights_dir=self.weights_dir, storage=self.work / "runs",
            name=name, samples=samples, concurrent=concurrent, cpus_per_trial=cpus or self.args.threads,
            scheduler=scheduler, seed=self.args.seed, subset=subset, max_epochs=max_epochs,
            sets=sets, gpus=self.gpus) + list(extra)
        with tqdm(total=total, desc=f"  search {name}", unit="result", leave=False,
                  disable=not sys.stdout.isatty()) as bar:
            run = searches.run_search(args, exp=self.work / "runs" / name,
                                      log=self.work / "logs" / f"{name}.log", progress=bar, **kw)
        if run.returncode != 0 and not run.interrupted:
            tail = run.log.read_text()[-2000:]
            raise RuntimeError(f"search {name} failed (exit {run.returncode}); log {run.log}:\n{tail}")
        return run

    def ticker(self, total: int, desc: str):
        from tqdm import tqdm
        return tqdm(total=total, desc=f"  {desc}", leave=False, disable=not sys.stdout.isatty())


CEILING_LAYOUT = "channels_last"  # tf_efficientnet_lite0's faster layout on the CPU (benchmarks/layout.py)


def bare_process(ctx: Context, size: int, thread_counts: tuple[int, ...], epochs: int, tag: str) -> list[dict]:
    """The ceiling: the bare loop (benchmarks/micro.py) in a process of its own, started like a
    trial worker (own session, OMP_NUM_THREADS = the most threads it may use, set before torch
    loads), in CEILING_LAYOUT, `epochs` epochs at each of `thread_counts` in turn."""
    import subprocess
    sc = ctx.scale
    out = ctx.work / f"bare-{tag}.json"
    (ctx.work / "logs").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "micro.py"), "--data-dir", ctx.data_dir,
           "--weights-dir", ctx.weights_dir, "--out", str(out), "--subset", str(sc.overhead_subset),
           "--input-size", str(size), "--batch-size", str(sc.overhead_batch),
           "--seed", str(ctx.args.seed), "--epochs", str(epochs), "--layout", CEILING_LAYOUT,
           "--threads", ",".join(map(str, thread_counts))]
    with open(ctx.work / "logs" / f"bare-{tag}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": str(max(thread_counts))})
        try:
            rc = proc.wait(timeout=3600)
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    if rc != 0:
        raise RuntimeError(f"the bare loop failed (exit {rc}); see {ctx.work / 'logs' / f'bare-{tag}.log'}")
    return json.loads(out.read_text())


def overhead_trial(ctx: Context, size: int, cpus: int) -> tuple[list[dict], searches.SearchRun, object]:
    """One Tune trial (1 head-only epoch, then all-trainable epochs) at `size` px with `cpus`
    CPUs; returns its all-trainable (stage-2) result rows, the search run and the trial."""
    from search.export import load_trials
    sc = ctx.scale
    e2 = sc.overhead_stage2_epochs
    sets = {"stages": 2, "stage1_epochs": 1, "stage2_epochs": e2, "unfreeze_depth": 99,
            "input_size": size, "batch_size": sc.overhead_batch, "aug_strength": 1.0}
    run = ctx.search(f"overhead-{size}px-{cpus}cpu", samples=1, concurrent=1, subset=sc.overhead_subset,
                     max_epochs=1 + e2, sets=sets, total=1 + e2, cpus=cpus)
    (trial,) = load_trials(run.exp)
    rows = [r for r in trial.results if r["epoch"] >= 2]  # stage 2: every layer trainable
    if len(rows) != e2:
        raise RuntimeError(f"the overhead trial reported {len(trial.results)} epochs; see {run.log}")
    return rows, run, trial


def trial_rates(rows: list[dict]) -> dict:
    """A trial's all-trainable epochs: whole-epoch img/s (Tune's time_this_iter_s: training,
    evaluation, checkpoint, report) and training-steps img/s (the loop's own clock)."""
    imgs = sum(r["images_per_sec"] * r["train_seconds"] for r in rows)
    wall, train = sum(r["time_this_iter_s"] for r in rows), sum(r["train_seconds"] for r in rows)
    return {"whole": imgs / wall, "train": imgs / train, "images_per_epoch": imgs / len(rows),
            "other_s": (wall - train) / len(rows)}


def ceiling_rates(bare: list[dict], thread_counts: tuple[int, ...]) -> dict:
    """The bare loop's whole-epoch and train img/s per thread count over all its epochs, and the
    fastest count by whole-epoch rate (the ceiling)."""
    per = {}
    for t in thread_counts:
        es = [e for e in bare if e["threads"] == t]
        train = sum(e["train_seconds"] for e in es)
        wall = train + sum(e["eval_seconds"] for e in es)
        n = sum(e["images"] for e in es)
        per[t] = {"whole": n / wall, "train": n / train, "eval_s": (wall - train) / len(es)}
    best = max(per, key=lambda t: per[t]["whole"])
    return {"per_threads": per, "threads": best, **per[best]}


def section_overhead(ctx: Context, rep: Report) -> None:
    sc = ctx.scale
    data = ctx.data()
    cpus = ctx.args.overhead_cpus
    counts = tuple(sorted({1, cpus}))  # the ceiling takes the faster of 1 thread and all the trial's CPUs
    other = 1 if cpus > 1 else (2 if ctx.cores >= 2 else None)  # the thread-scaling partner
    raw, size_notes = {}, []
    for i, size in enumerate(sc.overhead_sizes):
        ep = sc.bare_epochs_each_side[size]
        # ceiling, Tune trial, ceiling again: each alone on the machine (bar other people's work);
        # the two ceiling runs bracket the trial, so drifting load shows as their spread
        before = bare_process(ctx, size, counts, ep, f"{size}px-before")
        rows, run, trial = overhead_trial(ctx, size, cpus)
        after = bare_process(ctx, size, counts, ep, f"{size}px-after")
        tr, ce = trial_rates(rows), ceiling_rates(before + after, counts)
        ratio, loop_ratio = tr["whole"] / ce["whole"], tr["train"] / ce["train"]
        rep.add("1", f"Trial overhead at {size} px: whole all-trainable epoch, Tune trial ({cpus} CPU(s)) / "
                     f"ceiling (model-only loop, {CEILING_LAYOUT}, {ce['threads']} thread(s))",
                rate(tr["whole"]), rate(ce["whole"]), f"{ratio:.3f}", "≥ 0.90", verdict(ratio >= 0.90))
        rep.add("1", "  of which the training steps alone (in-loop clock / ceiling's train clock)",
                rate(tr["train"]), rate(ce["train"]), f"{loop_ratio:.3f}")
        b_side = {k: ceiling_rates(v, counts) for k, v in (("before", before), ("after", after))}
        per_t = "; ".join(f"{t} thread(s) {rate(v['whole'])} (before {rate(b_side['before']['per_threads'][t]['whole'])}, "
                          f"after {rate(b_side['after']['per_threads'][t]['whole'])})"
                          for t, v in ce["per_threads"].items())
        fixed = run.wall - sum(r["time_this_iter_s"] for r in trial.results)
        size_notes.append(f"{size} px: ceiling whole-epoch rates by thread count: {per_t}. Per epoch besides "
                          f"the training steps: Tune trial {tr['other_s']:.2f} s (evaluation + checkpoint + "
                          f"report), ceiling {ce['eval_s']:.2f} s (evaluation only). The search's fixed cost "
                          f"(Ray start, the worker's start, reading the data, building the model, shutdown): "
                          f"{fixed:.0f} s of the {run.wall:.0f} s it took.")
        raw[size] = {"trial_rows": rows, "bare_before": before, "bare_after": after, "search_wall": run.wall,
                     "ratio": ratio, "loop_ratio": loop_ratio, "ceiling_threads": ce["threads"]}
        if i == 0 and other is not None:
            # the same trial with the other CPU count, bracketed by `after` and one more ceiling run
            o_rows, o_run, _ = overhead_trial(ctx, size, other)
            o_after = bare_process(ctx, size, (other,), ep, f"{size}px-after-{other}cpu")
            o_tr = trial_rates(o_rows)
            o_ce = ceiling_rates([e for e in after if e["threads"] == other] + o_after, (other,))
            many, few = (tr, o_tr) if cpus > other else (o_tr, tr)
            hi, lo = max(cpus, other), min(cpus, other)
            scale = many["whole"] / few["whole"]
            rep.add("1", f"Thread scaling at {size} px: whole all-trainable epoch, trial with "
                         f"`--cpus-per-trial {hi}` / `--cpus-per-trial {lo}`",
                    rate(many["whole"]), rate(few["whole"]), f"{scale:.2f}", "> 1", verdict(scale > 1))
            rep.add("1", f"  the {other}-CPU trial / ceiling ({CEILING_LAYOUT}, {other} thread(s))",
                    rate(o_tr["whole"]), rate(o_ce["whole"]), f"{o_tr['whole'] / o_ce['whole']:.3f}")
            size_notes.append(f"Thread scaling: the {other}-CPU trial ran right after the {cpus}-CPU one's closing "
                              f"ceiling run (not interleaved: a trial is a whole search), then one more ceiling "
                              f"run at {other} thread(s) closed its own bracket. In-loop (training steps only): "
                              f"{hi} CPU(s) {rate(many['train'])}, {lo} CPU(s) {rate(few['train'])}.")
            raw["thread_scaling"] = {"other_cpus": other, "trial_rows": o_rows, "bare_after": o_after,
                                     "search_wall": o_run.wall, "ratio": scale}
    n_train, n_val = len(data.train), len(data.val)
    e2 = sc.overhead_stage2_epochs
    rep.note("1", f"Data: `--subset {sc.overhead_subset}` of the stand-in: {n_train} training images "
                  f"({n_train - n_train % sc.overhead_batch} per epoch after the ragged last batch is "
                  f"dropped), {n_val} validation images; tf_efficientnet_lite0, batch "
                  f"{sc.overhead_batch}; the trial gets `--cpus-per-trial {cpus}` (Ray sets its "
                  f"OMP_NUM_THREADS and the trial its torch threads to match).")
    rep.note("1", f"Tune trial: `run_search.py --num-samples 1 --scheduler fifo` with every hyper-parameter "
                  f"fixed by `--set` (stage 1: 1 epoch head only, then {e2} stage-2 epoch(s) with "
                  f"`unfreeze_depth=99` = every layer trainable, aug_strength 1, no mixup), the model in "
                  f"the layout the trial picks (loop.Precision.for_device). Timed: the stage-2 epochs, by "
                  f"Tune's `time_this_iter_s` = the trial worker's wall clock from one `tune.report` call "
                  f"to the next, so each epoch's figure holds the training steps (DeviceAugment at "
                  f"strength 1, forward, backward, SGD, lr schedule), the evaluation pass, the "
                  f"`torch.save` checkpoint, Tune persisting it to the experiment folder and the "
                  f"hand-shake with the driver. Not in it: the search's fixed cost (below).")
    rep.note("1", f"Ceiling (benchmarks/micro.py `BareLoop`, no Ray): the fastest way this machine runs the "
                  f"same model on the same images, batch and input size: every layer trainable, SGD "
                  f"Nesterov, label-smoothed CE, the model and batches in {CEILING_LAYOUT} (the faster "
                  f"layout for this backbone by benchmarks/layout.py, chosen here independently of the "
                  f"trial's code), at each of {' and '.join(map(str, counts))} torch thread(s) in turn, "
                  f"the faster of them taken; per batch only slice, float, resize, normalise (no "
                  f"augmentation, no lr schedule), then the same evaluation pass over the {n_val} "
                  f"validation images; no report, no checkpoint; 10 untimed warm-up steps per thread "
                  f"count. It runs in a process of its own started like the trial's worker (own session, "
                  f"OMP_NUM_THREADS={max(counts)}), "
                  + ", ".join(f"{sc.bare_epochs_each_side[s]} epoch(s) per thread count at {s} px" for s in sc.overhead_sizes)
                  + " right before the Tune search and as many right after it, each contender alone "
                    "(their spread is the drift of the machine's load). The trial's augmentation is "
                    "work the ceiling does not do, so the ratio charges it to the trial.")
    for n in size_notes:
        rep.note("1", n)
    rep.raw["overhead"] = raw


def section_headroom(ctx: Context, rep: Report) -> None:
    from benchmarks.micro import headroom, threads
    sc = ctx.scale
    b = ctx.bench()
    out = []
    for size in sc.sizes:
        rounds = sc.headroom_rounds[size]
        with ctx.ticker(2 * rounds, f"headroom {size} px") as t, threads(ctx.args.threads):
            r = headroom(b, size, sc.batch, rounds, sc.pipe_batches, tick=t.update)
        out.append(r)
        rep.add("2", f"Pipeline headroom at {size} px: augmentation+mixup / model train step",
                rate(r["pipeline"]["rate"]), rate(r["model"]["rate"]), f"{r['ratio']:.1f}",
                "≥ 5", verdict(r["ratio"] >= 5))
    dev = b.dev.type
    rep.note("2", f"Batch {sc.batch}, {ctx.args.threads} torch thread(s), device {dev}; the two contenders "
                  f"alternate ({', '.join(f'{s} px: {sc.headroom_rounds[s]}' for s in sc.sizes)} rounds "
                  f"after an untimed warm-up call each).")
    rep.note("2", f"Pipeline = what the trial's loop does per batch before the forward pass: a random index "
                  f"slice of the uint8 images already on the device, DeviceAugment at aug_strength 1 (one "
                  f"affine_grid/grid_sample pass for resize+flip+rotate+translate+zoom, colour jitter, "
                  f"erasing, normalisation) and timm Mixup/CutMix (alpha 0.8/1.0); {sc.pipe_batches} "
                  f"batches per timed call. Model = forward + label-smoothed CE + backward + SGD step of "
                  f"tf_efficientnet_lite0 with every layer trainable, on one fixed pre-augmented batch, "
                  f"in the layout a trial uses ({'channels_last' if b.prec.channels_last else 'contiguous'}).")
    rep.raw["headroom"] = out


def section_dataloader(ctx: Context, rep: Report) -> None:
    from benchmarks.micro import threads, vs_dataloader
    sc = ctx.scale
    b = ctx.bench()
    workers = ctx.cores
    out = []
    for size in sc.sizes:
        with ctx.ticker(2 * sc.dl_rounds, f"DataLoader {size} px") as t, threads(ctx.args.threads):
            r = vs_dataloader(b, ctx.data().train, size, sc.batch, sc.dl_rounds, sc.dl_batches,
                              workers, tick=t.update)
        out.append(r)
        target = size == max(sc.sizes)
        rep.add("3", f"Against the usual way at {size} px: our pipeline / DataLoader+PIL ({workers} workers)",
                rate(r["ours"]["rate"]), rate(r["dataloader"]["rate"]), f"{r['ratio']:.2f}×",
                "≥ 10× at 224" if target else "(info)", verdict(r["ratio"] >= 10) if target else "—")
    rep.note("3", f"The DataLoader gets num_workers = {workers} (the cores) worker processes; our pipeline "
                  f"runs in the one process on {ctx.args.threads} torch thread(s), a trial's share with "
                  f"`--cpus-per-trial {ctx.args.threads}`. That favours the DataLoader; it is also the "
                  f"robust choice on a shared machine, where two OpenMP threads on two busy cores stall at "
                  f"every parallel region. Batch {sc.batch}, "
                  f"{sc.dl_batches} batches per timed call, {sc.dl_rounds} alternating round(s).")
    rep.note("3", "DataLoader baseline: torchvision's CIFAR pattern (HWC uint8 rows, `Image.fromarray` per "
                  "item) with RandomHorizontalFlip, RandomAffine(15°, translate 0.125, scale 0.8-1.2), "
                  "ColorJitter(0.4, 0.4, 0.4), Resize(size), ToTensor, Normalize, RandomErasing(p 0.25, "
                  "area 0.02-0.2), default collate, then the same timm Mixup on each batch in the main "
                  "process. Geometry and colour run on the 32 px image before the one Resize, the cheapest "
                  "order for PIL. Each timed call starts a fresh iterator, so worker start-up is included "
                  "(as at every epoch without persistent_workers) and no worker prefetches in the "
                  "background while our side is being timed.")
    rep.raw["dataloader"] = out


def _dataset_mib(data_dir: str, seed: int) -> tuple[float, int]:
    from trainable.data import prepare_search_data
    d = prepare_search_data(data_dir, subset=None, val_fraction=0.1, seed=seed, download=False)
    nbytes = sum(a.nbytes for s in (d.train, d.val) for a in (s.images, s.fine, s.coarse))
    return nbytes / MiB, len(d.train) + len(d.val)


def section_memory(ctx: Context, rep: Report) -> None:
    sc = ctx.scale
    data_mib, n_images = _dataset_mib(ctx.data_dir, ctx.args.seed)
    # Every trial stays in stage 1 (head only) for the whole time box, on both datasets, so the
    # full-data and control trials are in the same phase when their memory peaks.
    sets = {"input_size": sc.mem_input, "batch_size": sc.mem_batch, "stages": 2,
            "stage1_epochs": 50, "stage2_epochs": 1}
    runs = {}
    variants = [("full", None)] + ([("control", sc.mem_control_subset)] if sc.mem_control_subset else [])
    for label, subset in variants:
        for conc in (1, 2):
            name = f"memory-{label}-{conc}"
            runs[(label, conc)] = ctx.search(
                name, samples=conc, concurrent=conc, subset=subset,
                max_epochs=51, sets=sets, memory=True,
                timebox=sc.mem_timebox, expect_workers=conc, timeout=600)
    m = {k: r.memory for k, r in runs.items()}
    for (label, conc), mm in m.items():
        if mm.max_concurrent_workers < conc:
            rep.note("4", f"WARNING: run {label}/{conc} never had {conc} trial workers alive at once "
                          f"(saw {mm.max_concurrent_workers}); its figure is not a concurrent one.")
    extra = (m[("full", 2)].pss - m[("full", 1)].pss) / MiB
    rep.add("4", "Memory: peak PSS of the whole search, 2 concurrent trials vs 1",
            f"{m[('full', 2)].pss / MiB:,.0f} MiB", f"{m[('full', 1)].pss / MiB:,.0f} MiB",
            f"+{extra:,.0f} MiB = {extra / data_mib:.2f} × dataset", "< 0.33 × dataset",
            verdict(extra < data_mib / 3))
    if ("control", 2) in m:
        c_extra = (m[("control", 2)].pss - m[("control", 1)].pss) / MiB
        data_part = extra - c_extra
        rep.add("4", f"  of which due to the data (minus the same pair on a {sc.mem_control_subset}/class subset)",
                f"{data_part:+,.0f} MiB", f"dataset {data_mib:,.0f} MiB",
                f"{data_part / data_mib:.2f} × dataset", "< 0.33 × dataset", verdict(data_part < data_mib / 3))
    rss_extra = (m[("full", 2)].rss - m[("full", 1)].rss) / MiB
    rep.add("4", "  peak RSS sum, 2 vs 1 (counts shared pages once per process)",
            f"{m[('full', 2)].rss / MiB:,.0f} MiB", f"{m[('full', 1)].rss / MiB:,.0f} MiB",
            f"+{rss_extra:,.0f} MiB")
    f2 = m[("full", 2)]
    rep.note("4", f"Dataset: the full stand-in training file split into train+val, {n_images} images: "
                  f"uint8 images + int64 fine/coarse labels = {data_mib:.1f} MiB. Searches: "
                  f"`run_search.py --num-samples N --max-concurrent N --cpus-per-trial {ctx.args.threads}` "
                  f"(N = 1, 2), no --subset, " + " ".join(f"`--set {k}={v}`" for k, v in sets.items())
                  + ": every trial stays in stage 1 (head only) throughout.")
    rep.note("4", f"Memory is the sum over the search's whole process tree (driver, GCS, raylet, dashboard "
                  f"and agents, every trial worker), sampled every second with psutil "
                  f"`memory_full_info()`. PSS (proportional set size) counts a page shared by n processes "
                  f"1/n in each, so the sum counts Ray's shared-memory object store (where the one copy of "
                  f"the dataset lives) once; the RSS sum counts it again in every process that touched it "
                  f"and overstates the total.")
    rep.note("4", f"An epoch over 45,000 images is minutes long on this CPU, so each search is stopped like a "
                  f"user's Ctrl-C once every trial worker has lived {sc.mem_timebox:.0f} s (start-up, the "
                  f"data from the object store, the model, then training steps). A trial that copied the "
                  f"dataset would show the whole copy at once; pages of the shared store count as they "
                  f"are touched: one trial worker had up to {f2.worker_plasma_rss / MiB:.0f} MiB of the "
                  f"object store resident (its PSS share {f2.worker_plasma_pss / MiB:.0f} MiB).")
    for (label, conc), mm in m.items():
        parts = ", ".join(f"{k} {v:,.0f}" for k, v in mm.at_pss_peak.items())
        rep.note("4", f"{label}, {conc} trial(s): peak PSS {mm.pss / MiB:,.0f} MiB ({parts} MiB; "
                      f"{mm.workers_at_pss_peak} trial worker(s) alive then), "
                      f"peak RSS sum {mm.rss / MiB:,.0f} MiB, peak USS sum {mm.uss / MiB:,.0f} MiB, "
                      f"{mm.samples} samples.")
    if ("control", 2) in m:
        rep.note("4", f"The second trial's own process (Python, torch, timm, the model, its activations "
                      f"and optimiser state) costs memory however the data is shared; the control pair "
                      f"(the same searches on `--subset {sc.mem_control_subset}`, "
                      f"{sc.mem_control_subset * 100} images) measures that cost, "
                      f"+{c_extra:,.0f} MiB, and the difference is what the data adds.")
    rep.raw["memory"] = {f"{k[0]}-{k[1]}": v.__dict__ for k, v in m.items()} | {"dataset_mib": data_mib}


def section_search(ctx: Context, rep: Report) -> None:
    from search.export import load_trials
    from search.searcher import METRIC
    sc = ctx.scale
    res = {}
    extra = ["--val-fraction", str(sc.search_val_fraction)]
    for sched in ("asha", "fifo"):
        run = ctx.search(f"search-{sched}", samples=sc.search_samples, concurrent=2, scheduler=sched,
                         subset=sc.search_subset, max_epochs=sc.search_max_epochs,
                         sets=sc.search_sets, extra=extra, same_configs=True)
        trials = load_trials(run.exp)
        best = max((t.best[METRIC] for t in trials if t.best is not None), default=float("nan"))
        res[sched] = {"run": run, "trials": trials, "epochs": sum(t.epochs_run for t in trials),
                      "best": best, "configs": searches.configs_of(run.exp)}
    a, f = res["asha"], res["fifo"]
    same = a["configs"] == f["configs"]
    ratio = a["epochs"] / f["epochs"]
    rep.add("5", f"Search: epochs spent, ASHA / FIFO ({sc.search_samples} identical configs)",
            f"{a['epochs']} epochs", f"{f['epochs']} epochs", f"{ratio:.2f}", "≤ 0.40", verdict(ratio <= 0.40))
    diff = 100 * (a["best"] - f["best"])
    rep.add("5", "  best val_acc found", f"{100 * a['best']:.1f} %", f"{100 * f['best']:.1f} %",
            f"{diff:+.1f} points", "within 1 point", verdict(diff >= -1.0))
    rep.add("5", "  wall time of the whole search", f"{a['run'].wall:.0f} s", f"{f['run'].wall:.0f} s",
            f"{a['run'].wall / f['run'].wall:.2f}")
    n_val = round(sc.search_val_fraction * sc.search_subset) * 100
    status = {}
    for t in a["trials"]:
        status[t.epochs_run] = status.get(t.epochs_run, 0) + 1
    rep.note("5", f"`run_search.py --space tiny --backbones tf_efficientnet_lite0 --num-samples "
                  f"{sc.search_samples} --max-concurrent 2 --cpus-per-trial {ctx.args.threads} --subset "
                  f"{sc.search_subset} --val-fraction {sc.search_val_fraction} --seed {ctx.args.seed}"
                  + "".join(f" --set {k}={v}" for k, v in sc.search_sets.items())
                  + (f" --max-epochs {sc.search_max_epochs}" if sc.search_max_epochs else "")
                  + f"` with `--scheduler asha` (grace period 1, reduction factor 3) and with "
                  f"`--scheduler fifo`. Validation: {n_val} images, so one image is "
                  f"{100 / n_val:.1f} points of val_acc. Best val_acc = the best epoch of the best trial.")
    common = len(set(a["configs"]) & set(f["configs"]))
    rep.note("5", f"Identical configs: {'yes' if same else 'NO'} ({common} of {len(f['configs'])} "
                  f"params.json in both searches). Optuna's TPE adapts to the results it sees, so "
                  f"left alone the two searches would share only TPE's 10 random start-up configs; "
                  f"benchmarks/_search_entry.py `--same-configs` stretches TPE's seeded random start-up "
                  f"phase over all {sc.search_samples} trials, which makes the draws independent of results.")
    rep.note("5", "ASHA trials by epochs run: " + ", ".join(f"{n} trial(s) {e} epoch(s)" for e, n in sorted(status.items()))
                  + f"; FIFO ran every trial to the end ({f['epochs']} epochs). Wall times include each "
                  f"search's fixed cost (Ray start and shutdown, a worker start and model build per trial).")
    rep.raw["search"] = {k: {"epochs": v["epochs"], "best": v["best"], "wall": v["run"].wall,
                             "per_trial": [(t.trial_id, t.epochs_run, t.best[METRIC] if t.best else None)
                                           for t in v["trials"]]} for k, v in res.items()}
    rep.raw["search"]["same_configs"] = same


def section_stages(ctx: Context, rep: Report) -> None:
    from benchmarks.micro import stage_cost, threads
    sc = ctx.scale
    b = ctx.bench()
    with ctx.ticker(3 * sc.stage_rounds, "stage cost") as t, threads(ctx.args.threads):
        r = stage_cost(b, sc.stage_input, sc.stage_batch, sc.stage_rounds, 1, tick=t.update)
    n1, n2, n3 = r["names"]
    ms = r["step_ms"]
    rep.add("6", f"Stage cost at {sc.stage_input} px: step time, {n1} / {n2}",
            f"{ms[n1]:,.0f} ms", f"{ms[n2]:,.0f} ms", f"{r['stage1_over_stage2']:.2f}")
    rep.add("6", f"  {n1} / {n3}", f"{ms[n1]:,.0f} ms", f"{ms[n3]:,.0f} ms", f"{r['stage1_over_all']:.2f}")
    rep.add("6", f"  {n2} / {n3}", f"{ms[n2]:,.0f} ms", f"{ms[n3]:,.0f} ms", f"{r['stage2_over_all']:.2f}")
    ok = r["stage1_backbone_params_with_grad"] == 0 and not r["stage1_bn_stats_moved"]
    rep.add("6", "  stage 1 backward stops at the head (backbone params with a gradient; BN stats)",
            f"{r['stage1_backbone_params_with_grad']} of {r['backbone_params']}; "
            f"{'moved' if r['stage1_bn_stats_moved'] else 'fixed'}", "—", "—", "0; fixed", verdict(ok))
    rep.note("6", f"Batch {sc.stage_batch}, {ctx.args.threads} thread(s), {sc.stage_rounds} alternating rounds; "
                  f"a step = forward + loss + backward + optimiser + lr-schedule step on one fixed "
                  f"pre-augmented batch (data work excluded: it is the same in every stage), with the "
                  f"trial's own `build_optimizer` param groups and `train_mode`.")
    rep.note("6", f"Stage 1 stops at the head: {'yes' if ok else 'NO'}: after a stage-1 step "
                  f"{r['stage1_backbone_params_with_grad']} of {r['backbone_params']} backbone parameters "
                  f"had a gradient ({r['stage1_head_params_with_grad']} head parameters did) and the frozen "
                  f"BatchNorm running statistics {'moved' if r['stage1_bn_stats_moved'] else 'did not move'}.")
    rep.raw["stages"] = r


RUNNERS = {"1": section_overhead, "2": section_headroom, "3": section_dataloader,
           "4": section_memory, "5": section_search, "6": section_stages}
TITLES = {"1": "Trial overhead", "2": "Pipeline headroom", "3": "Against the usual DataLoader",
          "4": "Memory", "5": "Search efficiency (ASHA vs FIFO)", "6": "Stage cost"}


# ----------------------------------------------------------------------------- output


def machine() -> dict:
    import ray
    import timm
    import torch
    import torchvision
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) \
        if torch.cuda.is_available() else "none"
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        mem = float("nan")
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "ram_gib": mem,
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__, "ray": ray.__version__}


def table(rows: list[Row]) -> str:
    head = ["#", "measurement", "ours", "baseline", "ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([r.section, r.what, r.ours, r.baseline, r.ratio, r.target, r.met]) + " |")
    return "\n".join(lines)


def markdown(rep: Report, info: dict) -> str:
    m = info["machine"]
    out = [BEGIN, "## Results", "",
           f"- Command: `{info['command']}`",
           f"- Date: {info['date']} (took {info['minutes']:.1f} min)",
           f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB RAM, GPU: {m['gpu']}",
           f"- Versions: Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, "
           f"timm {m['timm']}, ray {m['ray']}",
           f"- Load average (1 min) at start {info['load_start']:.2f}, at end {info['load_end']:.2f}: "
           f"other work shared the machine, so absolute rates vary; contenders were timed in alternation.",
           f"- Data: `{info['data_dir']}`, a real-image stand-in in the cifar-100-python format "
           f"(not CIFAR-100: its accuracies are not CIFAR-100 accuracies); weights: "
           f"`{info['weights_dir'] or 'random init'}`.",
           f"- Mode: {'--quick (shrunk sizes: a smoke run, not a record)' if info['quick'] else 'full'}; "
           f"sections run: {', '.join(info['sections'])}", "",
           table(rep.rows), ""]
    for s in SECTIONS:
        if s in rep.details:
            out += [f"### {s}. {TITLES[s]}", ""] + [f"- {d}" for d in rep.details[s]] + [""]
    out.append(END)
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def parse(argv: list[str] | None):
    default_data = SHARED / "data" / "tinyimagenet100-32"
    default_weights = SHARED / "weights"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shrink every part (a ~3 min smoke run)")
    p.add_argument("--out", default=None,
                   help="markdown file for the table (default: BENCHMARKS.md for a full run, none with --quick)")
    p.add_argument("--data-dir", default=str(default_data if default_data.is_dir() else REPO / "data"),
                   help="folder holding cifar-100-python/")
    p.add_argument("--weights-dir", default=str(default_weights) if (default_weights / "tf_efficientnet_lite0.pth").is_file() else "",
                   help="offline weights folder ('' = random init; speed is the same)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of sections 2, 3 and 6 and --cpus-per-trial of the searches "
                        "of sections 4 and 5 (section 1: --overhead-cpus)")
    p.add_argument("--overhead-cpus", type=int, default=min(2, os.cpu_count() or 1),
                   help="section 1: the trial's --cpus-per-trial (its ceiling takes the faster of 1 "
                        "thread and this many; the thread-scaling row adds a 1-CPU trial)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of 1-6")
    p.add_argument("--work-dir", default="", help="where searches and logs go (default: a new temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also dump the raw measurements to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from tqdm import tqdm
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"error: unknown section(s) {bad}: choose from {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    if not (Path(args.data_dir) / "cifar-100-python").is_dir():
        print(f"error: no cifar-100-python/ in --data-dir {args.data_dir}", file=sys.stderr)
        return 2
    scale = QUICK if args.quick else FULL
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="cifar-tune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else (None if args.quick else REPO / "BENCHMARKS.md")
    cmd = shlex.join(["python", "benchmarks/bench.py"] + (sys.argv[1:] if argv is None else list(argv)))
    print(f"bench: {'quick' if args.quick else 'full'} run of sections {','.join(sections)}; "
          f"searches and logs in {work}", flush=True)
    ctx = Context(args, scale, work)
    rep = Report()
    t0, load0 = time.time(), os.getloadavg()[0]
    with tqdm(total=len(sections), desc="bench", unit="section", disable=not sys.stdout.isatty()) as bar:
        for s in sections:
            bar.set_postfix_str(TITLES[s])
            ts = time.time()
            RUNNERS[s](ctx, rep)
            rep.note(s, f"Section time: {time.time() - ts:.0f} s.")
            bar.update(1)
    info = {"command": cmd, "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "minutes": (time.time() - t0) / 60, "machine": machine(), "load_start": load0,
            "load_end": os.getloadavg()[0], "data_dir": str(Path(args.data_dir).resolve()),
            "weights_dir": str(Path(args.weights_dir).resolve()) if args.weights_dir else "",
            "quick": args.quick, "sections": sections}
    print()
    print(table(rep.rows))
    m = info["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}; torch {m['torch']}, ray {m['ray']}; "
          f"{info['date']}, {info['minutes']:.1f} min; load {load0:.1f} -> {info['load_end']:.1f}")
    if out is not None:
        replace_block(out, markdown(rep, info))
        print(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "raw": rep.raw}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
