"""The search against what a careful person would do by hand, at the same wall-clock budget, over seeds.

    python benchmarks/duel.py [--seeds 0,1,2] [--contenders d,a@1,a@0.5,c@1] [--subset 10] [--max-epochs 3]

On the stand-in data (../shared/data/tinyimagenet100-32: real photos in CIFAR-100's format, NOT
CIFAR-100: its accuracies are not CIFAR-100 accuracies), one per-class subset and split per seed,
every contender runs through the real CLI (run_search.py in a subprocess, its own local Ray):
  (d) every recipe point (each pretrained recipe's procedure, its epochs fitted into the per-trial
      budget), all run to the end (FIFO, no time limit): what a careful person tries. Its wall
      time is the budget unit: `X@1` gets as long as (d) took on that seed, `X@0.5` half of it.
  (a) the search as a user runs it: budget plan (screen + promote), incumbent sampler, ASHA
  (a-local) (a) without the local search (--sampler tpe)   (a-screen) (a) without the screen (--screen off)
  (b) (a) with --warm-start none   (c) random search + ASHA, --warm-start none
Each contender's winner (best val_acc at its best epoch) is retrained on train+val and tested once
(`analyze.py`, as a user does). Per contender: the mean test accuracy over seeds, the mean paired
difference to (d) with its 95 % t-interval, trials, epochs, and when it first beat (d)'s best
val_acc. Results are kept in WORK/duel.json after every run (a re-run skips what is there); the
plot of each contender's incumbent val_acc against wall time goes to --plot.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, WEIGHTS, command_line, machine, md_table, run_cli  # noqa: E402
from spaces import space_view  # noqa: E402
from trainable import atomic  # noqa: E402
from trainable.cache import cache_root  # noqa: E402

USER_CACHE = cache_root()  # before cold_cache points CIFAR_TUNE_CACHE at a run's own folder

FLAGS = {"a": [], "a-local": ["--sampler", "tpe"], "a-screen": ["--screen", "off"],
         "b": ["--warm-start", "none"], "c": ["--warm-start", "none", "--sampler", "random"]}
LABELS = {"d": "(d) every recipe point, run to the end", "a": "(a) the search as users run it",
          "a-local": "(a) without the local search (TPE)", "a-screen": "(a) without the screen",
          "b": "(b) (a) with --warm-start none", "c": "(c) random search + ASHA"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--weights-dir", default=str(WEIGHTS))
    p.add_argument("--seeds", default="0,1,2", help="one split (and searcher/trial seed) per seed")
    p.add_argument("--contenders", default="d,a@1,a@0.5,c@1",
                   help="d first; others as NAME@MULTIPLE of (d)'s wall time (names: " + ", ".join(FLAGS) + ")")
    p.add_argument("--subset", type=int, default=10, help="training images per class (train+val)")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--max-epochs", type=int, default=3, help="epochs per trial over all stages")
    p.add_argument("--backbones", default="tf_efficientnet_lite0", help="the space's backbones to allow")
    p.add_argument("--cpus-per-trial", type=int, default=1)
    p.add_argument("--work-dir", default="/tmp/duel", help="runs/, logs/ and duel.json (kept: a re-run resumes)")
    p.add_argument("--plot", default="", help="PNG of incumbent val_acc against wall time (default WORK/duel.png)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 per class, 2 epochs, 64 px, one seed")
    a = p.parse_args(argv)
    if a.quick:
        a.subset, a.max_epochs, a.seeds = 3, 2, a.seeds.split(",")[0]
    a.plot = a.plot or str(Path(a.work_dir) / "duel.png")
    return a


def contenders(spec: str) -> list[tuple[str, float]]:
    """"d,a@1,c@0.5" -> [("d", 1.0), ("a", 1.0), ("c", 0.5)]; (d) always first: it sets the budget."""
    out = []
    for item in (i.strip() for i in spec.split(",") if i.strip()):
        name, _, mult = item.partition("@")
        if name != "d" and name not in FLAGS:
            raise SystemExit(f"error: unknown contender {name!r}: choose d or one of {', '.join(FLAGS)}")
        out.append((name, float(mult or 1)))
    return [c for c in out if c[0] == "d"][:1] + [c for c in out if c[0] != "d"] or [("d", 1.0)]


def key(name: str, mult: float) -> str:
    return "d" if name == "d" else f"{name}@{mult:g}"


def cli_args(name: str, budget_s: float | None, a: argparse.Namespace, seed: int, exp: Path) -> list:
    common = ["--gpus", "0", "--space", "cpu", "--backbones", a.backbones, "--max-epochs", a.max_epochs,
              "--subset", a.subset, "--val-fraction", a.val_fraction, "--seed", seed,
              "--cpus-per-trial", a.cpus_per_trial, "--data-dir", a.data_dir, "--weights-dir", a.weights_dir,
              "--storage-path", exp.parent, "--name", exp.name]
    if a.quick:
        common += ["--set", "input_size=64"]
    if name == "d":  # every recipe point whole: the warm start alone, FIFO, no screen
        return common + ["--warm-start", "recipes", "--num-samples", recipe_count(a, seed), "--scheduler", "fifo",
                         "--screen", "off"]
    return common + ["--time-budget", f"{budget_s:.0f}s", *FLAGS[name]]


def recipe_count(a: argparse.Namespace, seed: int) -> int:
    from spaces import Options, get_space
    from spaces.warm_start import recipe_points
    base = {"pretrained": True, "weights_dir": a.weights_dir, "seed": seed, "compile": False}
    fixed = {"input_size": 64} if a.quick else {}
    backbones = tuple(b for b in a.backbones.split(",") if b)
    return len(recipe_points(get_space("cpu"), Options(backbones, a.max_epochs), base, fixed)[0])


def incumbent_curve(exp: Path, start: float) -> list[tuple[float, float]]:
    """(seconds after `start`, best full-fidelity val_acc so far) at each improvement."""
    from analysis.experiment import load_trials
    rows = sorted((r["timestamp"] - start, r["val_acc"]) for t in load_trials(exp) for r in t.results
                  if isinstance(r.get("val_acc"), float) and r.get("status", "ok") == "ok"
                  and float(t.config.get("train_fraction", 1.0)) >= 1.0)
    curve, best = [], -1.0
    for ts, v in rows:
        if v > best:
            best = v
            curve.append((ts, v))
    return curve


def summarise(exp: Path, wall: float, start: float) -> dict:
    from analysis.experiment import load_trials, rank
    trials = load_trials(exp)
    ranked = rank(trials)
    best = ranked[0] if ranked else None
    return {"wall_s": wall, "trials": len(trials), "epochs": sum(t.epochs_run for t in trials),
            "best_val_acc": float(best.best["val_acc"]) if best else None, "winner": _name(best) if best else "",
            "curve": incumbent_curve(exp, start)}


def _name(t) -> str:
    """The winner's warm-start recipe (and whether a local move changed it), else key parameters."""
    import optuna

    from analysis.study import MOVE_ATTR, STUDY_NAME, WARM_CONFIG, study_url
    c = {k: v for k, v in t.config.items() if k != "train_fraction"}
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=study_url(t.path.parent))
        by_number = {ot.number: ot for ot in study.trials}
        for ot in study.trials:
            if {k: v for k, v in ot.user_attrs.get(WARM_CONFIG, {}).items() if k != "train_fraction"} == c:
                return "recipe " + ot.user_attrs["warm_start"]
            m = ot.system_attrs.get(MOVE_ATTR)
            if m and all(space_view(c).get(k) == v for k, v in ot.params.items()) and ot.params:
                parent = by_number.get(m["parent"])
                origin = parent.user_attrs.get("warm_start", f"trial {m['parent']}") if parent else "?"
                return f"move of {origin}: {', '.join(m['changed'])}"
    except Exception:  # noqa: BLE001 - no study: fall back to the parameters
        pass
    return (f"{c['backbone'].replace('tf_efficientnet_', '')} {c['input_size']} px, stages "
            f"{c['stage1_epochs']}/{c['stage2_epochs']}/{c['stage3_epochs']}, {c['optimizer']}")


def run_contender(name: str, mult: float, a: argparse.Namespace, seed: int, results: dict, work: Path) -> None:
    k = key(name, mult)
    if k in results[str(seed)]:
        return
    d = results[str(seed)].get("d")
    budget = None if name == "d" else mult * d["wall_s"]
    exp = work / "runs" / f"s{seed}-{k.replace('@', '_')}"
    if exp.exists():
        import shutil
        shutil.rmtree(exp)  # a run cut off by an earlier stop of this script: run it again whole
    print(f"[duel] seed {seed} {k} " + (f"(budget {budget:.0f} s)" if budget else "") + " ...", flush=True)
    cold_cache(work / "cache" / exp.name)
    start = time.time()
    wall = run_cli("run_search.py", cli_args(name, budget, a, seed, exp), work / "logs" / f"{exp.name}.log")
    r = summarise(exp, wall, start)
    r_wall = run_cli("analyze.py", [exp], work / "logs" / f"{exp.name}-analyze.log")
    m = json.loads((exp / "analysis" / "test_metrics.json").read_text())
    r.update(test_acc=m["test_acc"], retrain_s=r_wall, budget_s=budget)
    print(f"[duel]   {wall:.0f} s, {r['trials']} trials, best val_acc {r['best_val_acc']}, test_acc "
          f"{m['test_acc']:.4f} ({r['winner']})", flush=True)
    results[str(seed)][k] = r


def cold_cache(folder: Path) -> None:
    """Each run gets a cache of its own (the CLIs it starts inherit CIFAR_TUNE_CACHE): no contender
    reuses the frozen features another extracted. The measured step speeds are copied in, so no
    contender pays for timing them either."""
    import os
    import shutil

    from trainable.cache import ENV
    speeds = USER_CACHE / "speed.json"
    folder.mkdir(parents=True, exist_ok=True)
    if speeds.exists() and not (folder / "speed.json").exists():
        shutil.copy2(speeds, folder / "speed.json")
    os.environ[ENV] = str(folder)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    command = command_line("duel.py", argv)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "duel.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    t_all = time.time()
    seeds = [int(s) for s in str(a.seeds).split(",") if s.strip()]
    cs = contenders(a.contenders)
    for seed in seeds:
        results.setdefault(str(seed), {})
        for name, mult in [("d", 1.0)] + [c for c in cs if c[0] != "d"]:
            run_contender(name, mult, a, seed, results, work)
            atomic.write_text(store, json.dumps(results, indent=1) + "\n")
    plot(results, seeds, cs, Path(a.plot))
    print("\n" + markdown(a, command, results, seeds, cs, time.time() - t_all))
    return 0


def first_beat(curve: list, threshold: float) -> float | None:
    return next((ts for ts, v in curve if v > threshold), None)


def paired(diffs: list[float]) -> str:
    """Mean paired difference in points with its 95 % t-interval (n >= 2)."""
    if len(diffs) < 2:
        return f"{100 * diffs[0]:+.1f}" if diffs else "-"
    from scipy import stats
    m, se = statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
    h = stats.t.ppf(0.975, len(diffs) - 1) * se
    return f"{100 * m:+.1f} [{100 * (m - h):+.1f}, {100 * (m + h):+.1f}]"


def markdown(a, command: str, results: dict, seeds: list[int], cs: list, total_s: float) -> str:
    rows = []
    for name, mult in [("d", 1.0)] + [c for c in cs if c[0] != "d"]:
        k = key(name, mult)
        runs = [(results[str(s)][k], results[str(s)]["d"]) for s in seeds if k in results.get(str(s), {})]
        if not runs:
            continue
        tests = [r["test_acc"] for r, _ in runs]
        beats = [first_beat(r["curve"], d["best_val_acc"]) for r, d in runs] if name != "d" else []
        rows.append([LABELS[name] + ("" if name == "d" else f", {mult:g}x"), len(runs),
                     f"{100 * statistics.fmean(tests):.1f}", " ".join(f"{100 * t:.1f}" for t in tests),
                     "-" if name == "d" else paired([r["test_acc"] - d["test_acc"] for r, d in runs]),
                     f"{statistics.fmean(r['wall_s'] for r, _ in runs):.0f} s",
                     f"{statistics.fmean(r['trials'] for r, _ in runs):.1f}",
                     f"{statistics.fmean(r['epochs'] for r, _ in runs):.1f}",
                     "-" if name == "d" else ", ".join("never" if b is None else f"{b:.0f} s" for b in beats),
                     "; ".join(r["winner"] for r, _ in runs)])
    return "\n".join([
        f"- Command: `{command}`, started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(time.time() - total_s))} "
        f"(this invocation took {total_s / 60:.1f} min)", f"- Machine: {machine()}",
        f"- Data: the stand-in `{a.data_dir}` (ImageNet photos in CIFAR-100's format; **not CIFAR-100**: these "
        f"accuracies are not CIFAR-100 accuracies), `--subset {a.subset}` per class, val fraction {a.val_fraction}, "
        f"seeds {','.join(map(str, seeds))} (one split each); winners retrained on train+val and tested once on the "
        f"whole test file.",
        f"- Every trial: `--space cpu`, backbones {a.backbones}, {a.max_epochs} epochs, {a.cpus_per_trial} CPU per "
        f"trial; a contender's budget is a multiple of (d)'s wall time on the same seed.", "",
        md_table(["contender", "seeds", "test_acc % (mean)", "per seed", "vs (d), pts [95 % CI]", "wall",
                  "trials", "epochs", "first beat (d)'s best val_acc", "winners"], rows)])


def plot(results: dict, seeds: list[int], cs: list, path: Path) -> None:
    from report.plots import figure, save
    fig, axes = figure(5 * len(seeds), 3.6, nrows=1, ncols=len(seeds), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        runs = results.get(str(seed), {})
        for name, mult in [("d", 1.0)] + [c for c in cs if c[0] != "d"]:
            r = runs.get(key(name, mult))
            if not r or not r["curve"]:
                continue
            xs, ys = zip(*r["curve"])
            end = r["wall_s"]
            ax.step([*xs, end], [100 * y for y in (*ys, ys[-1])], where="post", label=key(name, mult))
        if "d" in runs and runs["d"]["best_val_acc"] is not None:
            ax.axhline(100 * runs["d"]["best_val_acc"], color="grey", ls=":", lw=1)
        ax.set_title(f"seed {seed} (stand-in data, not CIFAR-100)", fontsize=9)
        ax.set_xlabel("wall time, s")
        ax.set_ylabel("incumbent val_acc, %")
        ax.legend(fontsize=7)
    save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
