"""python benchmarks/layout.py [--quick] [--backbones a,b:small] [--sizes 32,128] [--threads 1,2]:
which memory layout runs each backbone faster on this CPU, channels_last or contiguous?

For each backbone and input size (batch 64, random init: speed does not depend on the weights):
the plain model loop (forward + label-smoothed CE + backward + SGD-Nesterov step, every layer
trainable) and a forward pass under inference_mode, each in channels_last and in the default
contiguous layout, at every torch thread count given. The four contenders of one (backbone, size,
mode), 2 layouts x 2 thread counts, run in alternating rounds (micro.interleave), so load from
other processes hits them alike; each call is sized to about --call-seconds. Prints a markdown
table and which layout wins per backbone: the backbones where contiguous trains faster belong in
trainable/loop.py's CPU_CONTIGUOUS. A full run rewrites the <!-- layout:begin/end --> block of
BENCHMARKS.md (text outside it is kept).

`name:small` builds the backbone with small_input_stem (the from-scratch recipes' 32 px stem).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.micro import interleave  # noqa: E402
from benchmarks.markdown import replace_block  # noqa: E402
from trainable.model import create_model, set_trainable, train_mode  # noqa: E402

BEGIN, END = "<!-- layout:begin -->", "<!-- layout:end -->"
DEFAULT_BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2",
                     "mobilenetv2_100", "resnet18", "resnet50", "vgg13_bn:small")
LAYOUTS = ("channels_last", "contiguous")
MODES = ("train", "forward")
SMOOTHING = 0.1
NOISE = 0.05  # a ratio within 5 % of 1 is inside the run-to-run spread on a shared machine


def parse_spec(spec: str) -> tuple[str, bool]:
    """'vgg13_bn:small' -> ('vgg13_bn', True): the backbone and whether it gets small_input_stem."""
    name, _, flag = spec.strip().partition(":")
    if flag not in ("", "small"):
        raise ValueError(f"backbone spec {spec!r}: the only suffix is ':small' (small_input_stem)")
    return name, flag == "small"


def _contender(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str,
               opt: torch.optim.Optimizer | None) -> Callable[[int], None]:
    """`steps` steps of one mode on a fixed batch (no data work: the layouts share it)."""
    def train(steps: int) -> None:
        for _ in range(steps):
            loss = F.cross_entropy(net(x), y, label_smoothing=SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def forward(steps: int) -> None:
        with torch.inference_mode():
            for _ in range(steps):
                net(x).argmax(1)
    return train if mode == "train" else forward


def measure(spec: str, size: int, *, batch: int, thread_counts: tuple[int, ...], rounds: int,
            call_seconds: float, modes: tuple[str, ...] = MODES, seed: int = 0,
            log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Images/s of one backbone at one input size, per mode, thread count and layout.

    Both layouts start from identical weights and see the identical batch. Per mode, each
    contender takes one untimed step, then one timed step that sets its steps per call (about
    `call_seconds`, at least 1), then all contenders alternate for `rounds` rounds.
    Returns rows {backbone, size, mode, threads, layout, rate, images, seconds, round_rates}.
    """
    name, small = parse_spec(spec)
    torch.manual_seed(seed)
    base = create_model(name, pretrained=False, small_input_stem=small)
    set_trainable(base, None)
    nets = {"contiguous": base, "channels_last": copy.deepcopy(base).to(memory_format=torch.channels_last)}
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 100, (batch,), generator=g)
    xs = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    old_threads = torch.get_num_threads()
    rows = []
    try:
        for mode in modes:
            fns, setups, steps = {}, {}, {}
            for layout in LAYOUTS:
                net = nets[layout]
                if mode == "train":
                    train_mode(net)
                else:
                    net.eval()
                opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                                      weight_decay=5e-4) if mode == "train" else None
                step = _contender(net, xs[layout], y, mode, opt)
                for t in thread_counts:
                    key = f"{layout}/{t}"
                    setups[key] = (lambda t=t: torch.set_num_threads(t))
                    fns[key] = (lambda step=step, key=key: (step(steps[key]), steps[key] * batch)[1])
                    setups[key]()
                    step(1)  # untimed: oneDNN primitives, allocator
                    t0 = time.perf_counter()
                    step(1)
                    steps[key] = max(1, round(call_seconds / max(time.perf_counter() - t0, 1e-6)))
            res = interleave(fns, rounds, torch.device("cpu"), setups=setups, warmup=False)
            for key, r in res.items():
                layout, t = key.split("/")
                rows.append({"backbone": spec, "size": size, "mode": mode, "threads": int(t),
                             "layout": layout, "rate": r["rate"], "images": r["images"],
                             "seconds": r["seconds"], "round_rates": r["round_rates"]})
            log(f"  {spec} {size} px {mode}: " + ", ".join(
                f"{k} {res[k]['rate']:.1f}" for k in fns) + " img/s")
    finally:
        torch.set_num_threads(old_threads)
        del nets, base
        gc.collect()
    return rows


def ratios(rows: list[dict]) -> dict[tuple, float]:
    """{(backbone, size, mode, threads): channels_last img/s / contiguous img/s}."""
    by = {(r["backbone"], r["size"], r["mode"], r["threads"], r["layout"]): r["rate"] for r in rows}
    return {k[:4]: v / by[k[:4] + ("contiguous",)] for k, v in by.items()
            if k[4] == "channels_last" and k[:4] + ("contiguous",) in by}


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in xs) / len(xs)) if xs else float("nan")


def verdicts(rows: list[dict]) -> dict[str, dict]:
    """Per backbone: the geometric mean over sizes and thread counts of the channels_last /
    contiguous ratio, for training and for the forward pass, and the winner. Training decides:
    it is where a trial spends its time (the evaluation pass is a small part of an epoch)."""
    rs = ratios(rows)
    out = {}
    for spec in dict.fromkeys(r["backbone"] for r in rows):
        train = _geomean([v for k, v in rs.items() if k[0] == spec and k[2] == "train"])
        fwd = _geomean([v for k, v in rs.items() if k[0] == spec and k[2] == "forward"])
        decide = train if not math.isnan(train) else fwd
        out[spec] = {"train": train, "forward": fwd,
                     "winner": "contiguous" if decide < 1 else "channels_last",
                     "within_noise": abs(math.log(decide)) < math.log1p(NOISE)}
    return out


def cpu_contiguous(v: dict[str, dict]) -> frozenset[str]:
    """The timm names whose training is faster contiguous: trainable/loop.py's CPU_CONTIGUOUS."""
    return frozenset(parse_spec(s)[0] for s, d in v.items() if d["winner"] == "contiguous")


def rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def table(rows: list[dict]) -> str:
    """One row per (backbone, size, mode, threads, layout); the ratio sits on the channels_last row."""
    rs = ratios(rows)
    lines = ["| backbone | size | mode | threads | layout | img/s | ratio channels_last/contiguous |",
             "|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(MODES)}
    for r in sorted(rows, key=lambda r: (list(dict.fromkeys(x["backbone"] for x in rows)).index(r["backbone"]),
                                         r["size"], order[r["mode"]], r["threads"], LAYOUTS.index(r["layout"]))):
        k = (r["backbone"], r["size"], r["mode"], r["threads"])
        ratio = f"{rs[k]:.2f}" if r["layout"] == "channels_last" and k in rs else ""
        lines.append(f"| {r['backbone']} | {r['size']} px | {r['mode']} | {r['threads']} | {r['layout']} "
                     f"| {rate(r['rate'])} | {ratio} |")
    return "\n".join(lines)


def summary(v: dict[str, dict]) -> str:
    lines = ["| backbone | train: channels_last/contiguous (geomean) | forward: same | faster layout |",
             "|---|---|---|---|"]
    for spec, d in v.items():
        tag = " (within noise)" if d["within_noise"] else ""
        lines.append(f"| {spec} | {d['train']:.2f} | {d['forward']:.2f} | {d['winner']}{tag} |")
    names = sorted(cpu_contiguous(v))
    literal = "frozenset({" + ", ".join(repr(n) for n in names) + "})" if names else "frozenset()"
    lines += ["", f"trainable/loop.py: `CPU_CONTIGUOUS: frozenset[str] = {literal}`"]
    return "\n".join(lines)


def markdown(rows: list[dict], info: dict) -> str:
    """The generated BENCHMARKS.md block: how it was run, the full table, the verdicts."""
    return "\n".join([
        BEGIN, "",
        f"- Command: `{info['command']}`",
        f"- Date: {info['date']} (took {info['minutes']:.1f} min); {info['cpu']}, {info['cores']} cores; "
        f"torch {torch.__version__}",
        f"- Load average (1 min) at start {info['load_start']:.2f}, at end {info['load_end']:.2f}; "
        f"batch {info['batch']}, {info['rounds']} alternating round(s) of ~{info['call_seconds']:g} s "
        f"calls per contender after an untimed and a calibration step.",
        "", table(rows), "", summary(verdicts(rows)), "", END])


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tf_efficientnet_lite0 at 32 px, batch 8, 1 round of short calls")
    p.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES),
                   help="comma-separated timm names; name:small = with small_input_stem")
    p.add_argument("--sizes", default="32,128", help="input sizes (px)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", default=",".join(str(t) for t in sorted({1, min(2, os.cpu_count() or 1)})),
                   help="torch thread counts to compare")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--call-seconds", type=float, default=2.0, help="target length of one timed call")
    p.add_argument("--out", default=None,
                   help="markdown file whose layout block to rewrite (default: BENCHMARKS.md for a full "
                        "run, none with --quick; '' = none)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.quick:
        specs, sizes, batch, rounds, call_s = ("tf_efficientnet_lite0",), (32,), 8, 1, 0.2
    else:
        specs = tuple(s for s in a.backbones.split(",") if s.strip())
        sizes = tuple(int(s) for s in a.sizes.split(",") if s.strip())
        batch, rounds, call_s = a.batch, a.rounds, a.call_seconds
    counts = tuple(int(t) for t in a.threads.split(",") if t.strip())
    for s in specs:
        parse_spec(s)  # a typo fails now, not after an hour of measuring
    out = Path(a.out) if a.out else (None if a.quick or a.out == "" else REPO / "BENCHMARKS.md")
    cmd = shlex.join(["python", "benchmarks/layout.py"] + (sys.argv[1:] if argv is None else list(argv)))
    print(f"layout: {len(specs)} backbone(s) x sizes {sizes} x {MODES} x threads {counts} x {LAYOUTS}, "
          f"batch {batch}, {rounds} round(s)", flush=True)
    t0, load0 = time.time(), os.getloadavg()[0]
    rows = []
    for spec in specs:
        for size in sizes:
            rows += measure(spec, size, batch=batch, thread_counts=counts, rounds=rounds,
                            call_seconds=call_s, log=lambda s: print(s, flush=True))
        print(f"  ... {time.time() - t0:.0f} s so far", flush=True)
    info = {"command": cmd, "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "minutes": (time.time() - t0) / 60, "cpu": _cpu(), "cores": os.cpu_count(),
            "load_start": load0, "load_end": os.getloadavg()[0], "batch": batch, "rounds": rounds,
            "call_seconds": call_s}
    print()
    print(table(rows))
    print()
    print(summary(verdicts(rows)))
    print(f"\n{info['cpu']}, {info['cores']} cores; {info['date']}, {info['minutes']:.1f} min; "
          f"load {load0:.1f} -> {info['load_end']:.1f}")
    if out is not None:
        replace_block(out, markdown(rows, info))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
