"""python benchmarks/layout.py [--quick] [--backbones a,b:small] [--sizes 32,128] [--threads 1,2]: which layout trains each
backbone faster on this CPU, channels_last or contiguous (trainable/loop.py's CPU_CONTIGUOUS)? Alternating rounds."""
import copy
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import alternate, forward_fn, listed, md_table, parse, parser, rate, sgd, step
from trainable.model import create_model, set_trainable, train_mode

DEFAULT_BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2",
                     "mobilenetv2_100", "resnet18", "resnet50", "vgg13_bn:small")
LAYOUTS, MODES = ("channels_last", "contiguous"), ("train", "forward")
NOISE = 0.05  # a ratio within 5 % of 1 is inside the run-to-run spread on a shared machine


def parse_spec(spec: str) -> tuple[str, bool]:
    """'vgg13_bn:small' -> ('vgg13_bn', True): the backbone and whether it gets small_input_stem."""
    name, _, flag = spec.strip().partition(":")
    if flag not in ("", "small"):
        raise ValueError(f"backbone spec {spec!r}: the only suffix is ':small' (small_input_stem)")
    return name, flag == "small"


def contender(net, x, y, mode: str):
    """(the timed call, its untimed setup) of one layout in one mode."""
    if mode == "forward":
        return forward_fn(net, x), net.eval
    opt = sgd(net)
    return (lambda: step(net, opt, x, y)), (lambda: train_mode(net))


def measure(spec: str, size: int, *, batch: int, thread_counts: tuple[int, ...], rounds: int,
            call_seconds: float) -> list[dict]:
    """Rows {backbone, size, mode, threads, layout, rate (img/s)}: both layouts from the same weights, on the same batch."""
    name, small = parse_spec(spec)
    torch.manual_seed(0)
    base = create_model(name, pretrained=False, small_input_stem=small)
    set_trainable(base, None)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 100, (batch,))
    nets = {"contiguous": (base, x), "channels_last": (copy.deepcopy(base).to(memory_format=torch.channels_last),
                                                       x.contiguous(memory_format=torch.channels_last))}
    rows = []
    for mode in MODES:
        made = {lay: contender(net, xb, y, mode) for lay, (net, xb) in nets.items()}
        keys = [(lay, t) for lay in made for t in thread_counts]  # torch's Timer sets each contender's threads itself
        secs = alternate({k: made[k[0]][0] for k in keys}, rounds, {k: k[1] for k in keys}, call_seconds,
                         {k: made[k[0]][1] for k in keys})
        rows += [{"backbone": spec, "size": size, "mode": mode, "threads": t, "layout": lay, "rate": batch / s}
                 for (lay, t), s in secs.items()]
        print(f"  {spec} {size} px {mode}: " + ", ".join(f"{r['layout']}/{r['threads']} {rate(r['rate'])}"
                                                         for r in rows[-len(secs):]) + " img/s", flush=True)
    return rows


def ratios(rows: list[dict]) -> dict[tuple, float]:
    """{(backbone, size, mode, threads): channels_last img/s / contiguous img/s}."""
    by = {(r["backbone"], r["size"], r["mode"], r["threads"], r["layout"]): r["rate"] for r in rows}
    return {k[:4]: v / by[k[:4] + ("contiguous",)] for k, v in by.items()
            if k[4] == "channels_last" and k[:4] + ("contiguous",) in by}


def verdicts(rows: list[dict]) -> dict[str, dict]:
    """Per backbone: geometric-mean ratios for training and forward, and the faster layout (training decides)."""
    rs, out = ratios(rows), {}
    for spec in dict.fromkeys(r["backbone"] for r in rows):
        gm = {m: statistics.geometric_mean(xs) if xs else float("nan")
              for m in MODES for xs in [[v for k, v in rs.items() if k[0] == spec and k[2] == m]]}
        decide = gm["train"] if not math.isnan(gm["train"]) else gm["forward"]
        out[spec] = {**gm, "winner": "contiguous" if decide < 1 else "channels_last",
                     "within_noise": abs(math.log(decide)) < math.log1p(NOISE)}
    return out


def cpu_contiguous(v: dict[str, dict]) -> frozenset[str]:
    """The timm names whose training is faster contiguous: trainable/loop.py's CPU_CONTIGUOUS."""
    return frozenset(parse_spec(s)[0] for s, d in v.items() if d["winner"] == "contiguous")


def table(rows: list[dict]) -> str:
    """One row per (backbone, size, mode, threads, layout); the ratio sits on the channels_last row."""
    rs, specs = ratios(rows), list(dict.fromkeys(r["backbone"] for r in rows))
    body = []
    for r in sorted(rows, key=lambda r: (specs.index(r["backbone"]), r["size"], MODES.index(r["mode"]), r["threads"],
                                         LAYOUTS.index(r["layout"]))):
        k = (r["backbone"], r["size"], r["mode"], r["threads"])
        body.append([r["backbone"], f"{r['size']} px", r["mode"], r["threads"], r["layout"], rate(r["rate"]),
                     f"{rs[k]:.2f}" if r["layout"] == "channels_last" and k in rs else ""])
    return md_table(["backbone", "size", "mode", "threads", "layout", "img/s", "ratio channels_last/contiguous"], body)


def summary(v: dict[str, dict]) -> str:
    body = [[s, f"{d['train']:.2f}", f"{d['forward']:.2f}", d["winner"] + (" (within noise)" if d["within_noise"] else "")]
            for s, d in v.items()]
    names = sorted(cpu_contiguous(v))
    literal = "frozenset({" + ", ".join(map(repr, names)) + "})" if names else "frozenset()"
    return (md_table(["backbone", "train: channels_last/contiguous (geomean)", "forward: same", "faster layout"], body)
            + f"\n\ntrainable/loop.py: `CPU_CONTIGUOUS: frozenset[str] = {literal}`")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, data=False, quick="smoke run: lite0 at 32 px, batch 8, 1 round of short calls")
    p.add_argument("--backbones", type=listed(), default=",".join(DEFAULT_BACKBONES),
                   help="timm names; name:small = small_input_stem")
    p.add_argument("--sizes", type=listed(int), default="32,128")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=listed(int), default=",".join(map(str, sorted({1, min(2, os.cpu_count() or 1)}))))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--call-seconds", type=float, default=2.0, help="least timed seconds per contender and turn")
    a, run = parse(p, "layout.py", argv)
    if a.quick:
        a.backbones, a.sizes, a.batch, a.rounds, a.call_seconds = ["tf_efficientnet_lite0"], [32], 8, 1, 0.2
    for s in a.backbones:
        parse_spec(s)  # a typo fails now, not after an hour of measuring
    rows = [r for s in a.backbones for size in a.sizes
            for r in measure(s, size, batch=a.batch, thread_counts=a.threads, rounds=a.rounds, call_seconds=a.call_seconds)]
    print("\n" + run.header(f"; batch {a.batch}, {a.rounds} alternating round(s) of >= {a.call_seconds:g} s per contender")
          + f"\n\n{table(rows)}\n\n{summary(verdicts(rows))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
