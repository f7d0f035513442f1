"""The benchmarks' one harness: options, header, tables, timing, the model-only ceiling, the CLIs run as a user runs them."""
import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from statistics import fmean
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from analysis.command import command
from trainable import atomic
from trainable.augment import normalisation_of
from trainable.data import prepare_search_data
from trainable.loop import Precision
from trainable.model import create_model, set_trainable, train_mode
from trainable.trial import pick_device, run_trial, to_device

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyimagenet100-32"  # the real-image stand-in (not CIFAR-100)
WEIGHTS = REPO.parent / "shared" / "weights"
BACKBONE = "tf_efficientnet_lite0"
MiB = 2 ** 20


def parser(doc: str, *, data=True, work_dir: str | None = None, work_help="runs/ and logs/", quick="") -> argparse.ArgumentParser:
    """The script's options with the shared ones: --data-dir/--weights-dir, --work-dir ('' a new temp folder), --quick."""
    p = argparse.ArgumentParser(description=doc)
    if data:
        p.add_argument("--data-dir", default=str(DATA), help="folder holding cifar-100-python/")
        p.add_argument("--weights-dir", default=str(WEIGHTS), help="folder of offline weights (<timm name>.pth)")
    if work_dir is not None:
        p.add_argument("--work-dir", default=work_dir, help=work_help + ("" if work_dir else " (default: a new temp folder)"))
    if quick:
        p.add_argument("--quick", action="store_true", help=quick)
    return p


def parse(p: argparse.ArgumentParser, script: str, argv: list[str] | None, full: dict | None = None, quick: dict | None = None):
    """(the options, the run's Invocation); an option still None takes its value from `quick` under --quick, else `full`."""
    a = p.parse_args(argv)
    for k, v in {**(full or {}), **((quick or {}) if getattr(a, "quick", False) else {})}.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if getattr(a, "work_dir", None) == "":
        a.work_dir = tempfile.mkdtemp(prefix=f"{Path(script).stem}-")
    return a, Invocation(script, argv)


def listed(cast: Callable = str) -> Callable[[str], list]:
    """An option's type for a comma-separated list: '32,128' -> [32, 128] (blanks left out)."""
    def comma_separated(text: str) -> list:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    return comma_separated


def split(a, subset: int | None, val_fraction: float = 0.1, seed: int = 0):
    """The search's train/val split of --data-dir (never downloads)."""
    return prepare_search_data(a.data_dir, subset=subset, val_fraction=val_fraction, seed=seed, download=False)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "unknown CPU")
    gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, GPU: {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, timm {version('timm')}, ray {version('ray')}")


class Invocation:
    """One run of a script: its command as typed (argv None: sys.argv's), start time and load, for its header."""

    def __init__(self, script: str, argv: list[str] | None):
        self.command = command(f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv))
        self.t0, self.load0 = time.time(), os.getloadavg()[0]

    def header(self, note: str = "") -> str:
        start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.t0))
        return (f"- Command: `{self.command}`, started {start} (took {(time.time() - self.t0) / 60:.1f} min; load "
                f"{self.load0:.1f} -> {os.getloadavg()[0]:.1f}){note}\n- Machine: {machine()}")


def md_table(head: list[str], rows: list) -> str:
    """A markdown table (pandas' to_markdown would need tabulate, which the project does not install)."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**NO**"


class Results(dict):
    """Results kept in a json file, rewritten after every run: a re-run skips what is there."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(json.loads(self.path.read_text()) if self.path.exists() else {})

    def save(self) -> None:
        atomic.write_text(self.path, json.dumps(self, indent=1) + "\n")


def per_call(fn: Callable[[], object], threads: int, min_seconds: float) -> float:
    """Mean seconds per call at `threads` torch threads: torch's Timer (a warm-up call, then calls for `min_seconds`)."""
    from torch.utils.benchmark import Timer  # at import it warns about CUDA_HOME on a CPU machine: only when timing
    return Timer("fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(min_run_time=min_seconds).mean


def alternate(fns: dict, rounds: int, threads: int | dict, min_seconds: float, setups: dict | None = None,
              reduce: Callable = fmean) -> dict:
    """Seconds per call of each contender, timed in turn `rounds` times (outside load hits all alike), `reduce`d."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            (setups or {}).get(name, lambda: None)()
            times[name].append(per_call(fn, threads[name] if isinstance(threads, dict) else threads, min_seconds))
    return {k: reduce(v) for k, v in times.items()}


def step(net: torch.nn.Module, opt: torch.optim.Optimizer, x, y, prec: Precision | None = None, sched=None) -> None:
    """The model's own work on a ready batch: forward, label-smoothed CE, backward, optimiser step."""
    with prec.autocast() if prec is not None else contextlib.nullcontext():
        out = net(x)
        loss = F.cross_entropy(out[0] if isinstance(out, tuple) else out, y, label_smoothing=0.1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()


def make_bench(train, weights_dir: str, channels_last: bool | None = None) -> SimpleNamespace:
    """A model and the training images (uint8) on the device, in the layout a trial picks (`channels_last` forces one)."""
    dev = pick_device()
    net = create_model(BACKBONE, pretrained=bool(weights_dir), weights_dir=weights_dir)
    prec = Precision.for_device(dev, BACKBONE)
    if channels_last is not None:
        prec = Precision(dev, prec.amp_dtype, channels_last)
    prec.model_to(net)
    x, fine, coarse = to_device(train, dev)
    mean, std = normalisation_of(net.backbone)
    return SimpleNamespace(net=net, x=x, fine=fine, coarse=coarse, mean=mean, std=std, dev=dev, prec=prec)


def sgd(net: torch.nn.Module, fused: bool = False) -> torch.optim.SGD:
    """The ceiling's optimiser over every parameter; `fused`: torch's fused kernel (default on the CPU: a Python loop)."""
    return torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4,
                           fused=True if fused else None)


def fixed_batch(b, bs: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random batch of images (in the bench's layout, on its device) and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bs, 3, size, size, generator=g)
    return b.prec.prepare(x.to(b.dev)), torch.randint(0, 100, (bs,), generator=g).to(b.dev)


def model_fn(b, size: int, bs: int, steps: int = 1, fused: bool = False) -> Callable[[], int]:
    """The ceiling: `steps` SGD steps of the whole network (every layer trainable) on one fixed batch; returns images."""
    set_trainable(b.net, None)
    train_mode(b.net)
    opt, (x, y) = sgd(b.net, fused), fixed_batch(b, bs, size)

    def run() -> int:
        for _ in range(steps):
            step(b.net, opt, x, y, b.prec)
        return steps * bs
    return run


def forward_fn(net: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """The forward pass of `x` under inference_mode."""
    def forward():
        with torch.inference_mode():
            net(x)
    return forward


def timed_trial(config: dict, train, val, **kw) -> SimpleNamespace:
    """run_trial without checkpoints: net, last, rows (every epoch's result), epoch_s (report to report), wall_s."""
    rows, stamps, t0 = [], [], time.perf_counter()
    net, last = run_trial(config, train, val, lambda m, _c: (rows.append(m), stamps.append(time.perf_counter())),
                          checkpoint=False, **kw)
    return SimpleNamespace(net=net, last=last, rows=rows, epoch_s=[b - a for a, b in zip([t0, *stamps], stamps)],
                           wall_s=time.perf_counter() - t0)


def flags(sets: dict | None = None, **opts) -> list[str]:
    """num_samples=4 -> --num-samples 4 (None and False left out, True the bare flag); `sets` {k: v} -> --set k=v."""
    out = [x for k, v in opts.items() if v is not None and v is not False
           for x in [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])]
    return out + [x for k, v in (sets or {}).items() for x in ("--set", f"{k}={v}")]


def run_cli(script: str, args: list, log: Path, *, watch: Callable | None = None, timeout: float = 4 * 3600) -> float:
    """Run a CLI in a session of its own: its wall s; `watch(proc)` True stops it as Ctrl-C does (Tune saves its state)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if script == "run_search.py":  # not 8265: other people's searches and tests on this machine race for it
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args = [*args, "--dashboard-port", sock.getsockname()[1]]
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    t0, stopped = time.time(), False
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                if not stopped and ((watch is not None and watch(proc)) or time.time() - t0 > timeout):
                    proc.send_signal(signal.SIGINT)
                    stopped = True
        except BaseException:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
            raise
    if proc.returncode != 0 and not stopped:  # stopped: Tune saved what it had; the caller reads that
        raise RuntimeError(f"{script} exited {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
    return time.time() - t0


def search(a, name: str, sets: dict | None = None, *, log: Path | None = None, watch=None, timeout: float = 4 * 3600,
           **opts) -> tuple[Path, float]:
    """A whole search through run_search.py in WORK/runs/NAME (log: WORK/logs/NAME.log): (its folder, its wall seconds)."""
    work = Path(a.work_dir)
    args = flags(sets, **opts, data_dir=a.data_dir, storage_path=work / "runs", name=name)
    return work / "runs" / name, run_cli("run_search.py", args, log or work / "logs" / f"{name}.log", watch=watch,
                                         timeout=timeout)
