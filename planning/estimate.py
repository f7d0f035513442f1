"""What a search will cost, measured on the real device before Ray starts (Ray Tune has none: ray#6618):
a few timed steps per backbone x input size (cached per machine) price each epoch of a few hundred configs
drawn from the space and of the warm-start points; that gives a trial's mean cost, FIFO or under ASHA."""
from __future__ import annotations

import bisect
import itertools
import json
import os
import statistics
import timeit
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from analysis.experiment import duration
from planning.define import DefineByRun
from planning.precheck import draw
from spaces import Options, Space
from trainable import atomic, features
from trainable.augment import policy_for
from trainable.cache import cache_root
from trainable.config import TrialConfig
from trainable.errors import UserError
from trainable.loop import Precision
from trainable.model import create_model, set_trainable, train_mode
from trainable.stages import plan_stages

ESTIMATE_FILE = "estimate.json"
SAMPLES = 300  # configs drawn from the space for the expected cost
STEPS = 2  # timed steps per measurement (after one untimed); the fastest counts
STARTUP_S = 8.0  # a trial worker's start and model build (measured: 5-10 s on CPU)
RATES = ("frozen", "train", "eval", "head")  # seconds per image of each kind of step (see measure)


def device_key(device: Any, threads: int, precision: str = "auto") -> str:
    """The speed cache's key: device, threads, and the --precision when it is not the default."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{os.cpu_count()}"
    return f"{name}|threads{threads}" + ("" if precision == "auto" else f"|{precision}")


def _per_image(step: Callable[[], Any], device: Any, batch: int) -> float:
    """Seconds per image of `step` on `batch` images: the fastest of STEPS timed calls after an untimed one
    (torch.utils.benchmark's Timer averages after more warm-up: other numbers than the budget plan's)."""
    def synced() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return min(timeit.repeat(synced, repeat=STEPS + 1, number=1)[1:]) / batch


def _sgd_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, prec: Precision) -> Callable[[], None]:
    """One SGD step of `net`'s trainable parameters on (x, y), at the trials' precision."""
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step() -> None:
        with prec.autocast():
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


TIMING_BATCH_MAX = 256


def measure(backbone: str, size: int, device: Any, precision: str = "auto", batch: int = 64) -> dict[str, float]:
    """Seconds per image of a head-only training step ("frozen"), an all-trainable one ("train": an upper
    bound for stage 2), an evaluation forward pass ("eval") and a head step on cached features ("head"), at
    the trials' precision and batch size (per-image cost depends on the batch, not on the weights)."""
    net = create_model(backbone, pretrained=False)
    prec = Precision.for_device(device, backbone, precision)
    prec.model_to(net)
    x = prec.prepare(torch.randn(batch, 3, size, size, device=device))
    y = torch.randint(0, 100, (batch,), device=device)
    out = {}
    for mode, top in (("frozen", 0), ("train", None)):
        set_trainable(net, top)
        train_mode(net)
        out[mode] = _per_image(_sgd_step(net, x, y, prec), device, batch)
    net.eval()
    with torch.inference_mode(), prec.autocast():
        out["eval"] = _per_image(lambda: net(x), device, batch)
    features_in = torch.randn(batch, net.fine_head.in_features, device=device)
    out["head"] = _per_image(_sgd_step(net.fine_head, features_in, y, prec), device, batch)
    return out


def speeds_for(combos: set[tuple[str, int]], device: Any, threads: int,
               log=print, precision: str = "auto", batch: int = 64) -> dict[str, dict[str, float]]:
    """"backbone@size" -> seconds per image of each of RATES at `batch` images a step, for every (backbone, size)
    in `combos` (and whatever else the machine's cache holds for this device); those not cached are timed."""
    key = f"{device_key(device, threads, precision)}|batch{batch}"
    path = cache_root() / "speed.json"  # per machine: the step times do not depend on the experiment
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    mine = cache.setdefault(key, {})
    todo = sorted((b, s) for b, s in combos if not set(RATES) <= mine.get(f"{b}@{s}", {}).keys())  # missing a rate: re-time
    if not todo:
        return mine
    log(f"estimate: timing {len(todo)} backbone x input size combination(s) on {key} (cached in {path} for next time) ...")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b, s in todo:
            mine[f"{b}@{s}"] = measure(b, s, device, precision, batch)
    finally:
        torch.set_num_threads(old)
    try:  # a cache: a full disk costs the next run a re-timing, not this search
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(cache, indent=1) + "\n")
    except (OSError, UserError) as e:
        log(f"warning: step times not cached: {e}")
    return mine


def epoch_seconds(cfg: TrialConfig, speeds: dict[str, dict[str, float]], n_train: int, n_val: int) -> list[float]:
    """Seconds of each planned epoch, training and validation. A head-only stage on cached features pays
    forward passes over its images, their mirrors and the validation images in its first epoch (an
    upper bound: they may be cached), then head-only steps; a one-epoch stage caches none."""
    r = speeds[f"{cfg.backbone}@{cfg.input_size}"]
    out = []
    for st in plan_stages(cfg):
        if features.enabled() and features.why_not_cached(cfg, st) is None and st.epochs >= 2:
            views = 2 if policy_for(cfg.aug_strength, cfg.augment).flip else 1
            out += [(n_train * views + n_val) * r["eval"]] + [(n_train + n_val) * r["head"]] * (st.epochs - 1)
            continue
        per_img = r["frozen"] if st.top_blocks == 0 else r["train"]
        out += [n_train * per_img + n_val * r["eval"]] * st.epochs
    return out


def reach(epoch: int, rungs: list[int], rf: int) -> float:
    """Share of trials that run epoch `epoch` (1-based) under ASHA: 1/rf past each rung."""
    return float(rf) ** -sum(1 for r in rungs if r < epoch)


def asha_rungs(grace: int, rf: int, max_t: int) -> list[int]:
    """ASHA's milestones below max_t: grace, grace*rf, grace*rf^2, ..."""
    return list(itertools.takewhile(lambda r: r < max_t, (grace * rf**k for k in itertools.count())))


@dataclass
class Estimate:
    per_combo: dict[str, dict[str, float]]  # "backbone@size" -> {"frozen_epoch_s", "train_epoch_s", "cached_epoch_s"}
    trial_fifo_s: float  # mean seconds of a whole trial
    trial_asha_s: float  # mean seconds of a trial under ASHA (pruned share included)
    warm_fifo_s: float  # the warm-start points' trials, summed, FIFO
    warm_asha_s: float
    parallel: int
    num_samples: int | None
    budget_s: float | None
    rungs: list[int]
    warm_train_s: list[float]  # each warm-start point's training seconds, whole plan
    warm_val_s: list[float]  # and its validation seconds (every epoch, whole val split)
    startup_s: float  # a trial worker's start and model build
    n_warm: int

    def wall(self, n: int, asha: bool) -> float:
        """Expected wall seconds for n trials, the warm-start points first."""
        per = (self.trial_asha_s if asha else self.trial_fifo_s) + self.startup_s
        warm_n = min(n, self.n_warm)
        warm = (self.warm_asha_s if asha else self.warm_fifo_s) * (warm_n / max(1, self.n_warm))
        return (warm + warm_n * self.startup_s + max(0, n - warm_n) * per) / self.parallel

    def trials_in(self, budget_s: float, asha: bool) -> int:
        """How many trials fit in a time budget (wall grows with n: a bisection)."""
        return bisect.bisect_right(range(1, 100001), budget_s, key=lambda n: self.wall(n, asha))


def estimate(space: Space, opts: Options, fixed: dict[str, Any], base: dict[str, Any], warm: list,
             *, n_train: int, n_val: int, device: Any, threads: int, parallel: int,
             num_samples: int | None, budget_s: float | None, rungs: list[int], rf: int,
             seed: int = 0) -> Estimate:
    """The cost of the search described by the arguments (see the module docstring)."""
    define = DefineByRun(space, opts, fixed, base)
    configs, _ = draw(lambda trial: TrialConfig.from_dict(define(trial)), draws=1 if space.recipe else SAMPLES,
                      seed=seed)
    warm_cfgs = [TrialConfig.from_dict(p.config) for p in warm]
    combos = {(c.backbone, c.input_size) for c in configs + warm_cfgs}
    # one timing per combo, at the typical batch: per-image cost is flat past a few hundred images a step, and
    # a bigger timing batch would only cost memory (a --set batch_size of 10^6 ran the machine out of it)
    batch = min(statistics.median_low(c.batch_size for c in configs + warm_cfgs), TIMING_BATCH_MAX)
    speeds = speeds_for(combos, device, threads, precision=base.get("precision", "auto"), batch=batch)

    def costs(c: TrialConfig) -> tuple[float, float]:  # a whole trial's seconds: FIFO, and under ASHA
        secs = epoch_seconds(c, speeds, n_train, n_val)
        return sum(secs), sum(s * reach(e, rungs, rf) for e, s in enumerate(secs, start=1))
    runs, warm_runs = [costs(c) for c in configs], [costs(c) for c in warm_cfgs]
    warm_val = [n_val * speeds[f"{c.backbone}@{c.input_size}"]["eval"] * c.total_epochs for c in warm_cfgs]
    per_combo = {}
    for b, s in sorted(combos):
        r = speeds[f"{b}@{s}"]
        per_combo[f"{b}@{s}"] = {"frozen_epoch_s": n_train * r["frozen"] + n_val * r["eval"],
                                 "train_epoch_s": n_train * r["train"] + n_val * r["eval"],
                                 "cached_epoch_s": (n_train + n_val) * r["head"]}
    return Estimate(per_combo=per_combo, trial_fifo_s=statistics.fmean(f for f, _ in runs),
                    trial_asha_s=statistics.fmean(a for _, a in runs), warm_fifo_s=sum(f for f, _ in warm_runs),
                    warm_asha_s=sum(a for _, a in warm_runs), parallel=max(1, parallel), num_samples=num_samples,
                    budget_s=budget_s, rungs=rungs, warm_train_s=[f - v for (f, _), v in zip(warm_runs, warm_val)],
                    warm_val_s=warm_val, startup_s=STARTUP_S, n_warm=len(warm_cfgs))


def describe(e: Estimate) -> str:
    """The estimate as the lines the CLI prints."""
    lines = ["cost estimate (measured on this device; epochs = training + validation):",
             "  backbone@size                      frozen epoch   trainable epoch   frozen, cached features"]
    for k, v in e.per_combo.items():
        lines.append(f"  {k:34s} {duration(v['frozen_epoch_s']):>12s}   {duration(v['train_epoch_s']):>15s}   "
                     f"{duration(v['cached_epoch_s']):>23s}")
    rungs = f"with ASHA's rungs at epochs {e.rungs}" if e.rungs else "with no ASHA rung below the last epoch"
    lines.append(f"  a trial (its {e.startup_s:.0f} s start-up included): {duration(e.trial_fifo_s + e.startup_s)} "
                 f"run to the end, {duration(e.trial_asha_s + e.startup_s)} on average {rungs}; "
                 f"{e.parallel} trial(s) at once (timed one at a time: trials sharing cores run slower)")
    if e.n_warm:
        lines.append(f"  the {e.n_warm} warm-start trial(s): {duration(e.wall(e.n_warm, False))} FIFO, "
                     f"about {duration(e.wall(e.n_warm, True))} with ASHA")
    if e.num_samples:
        lines.append(f"  {e.num_samples} trials: at most {duration(e.wall(e.num_samples, False))} (FIFO), "
                     f"expected {duration(e.wall(e.num_samples, True))} with ASHA")
    if e.budget_s:
        lines.append(f"  time budget {duration(e.budget_s)}: about {e.trials_in(e.budget_s, True)} trials "
                     f"with ASHA ({e.trials_in(e.budget_s, False)} run to the end)")
    return "\n".join(lines)


def save(exp: Path, e: Estimate) -> None:
    exp.mkdir(parents=True, exist_ok=True)
    atomic.write_text(exp / ESTIMATE_FILE, json.dumps(asdict(e), indent=1) + "\n")
