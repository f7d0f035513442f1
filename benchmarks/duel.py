"""The search against what a careful person would do by hand, at the same wall-clock budget.

    python benchmarks/duel.py [--budget 10m] [--subset 10] [--max-epochs 3] [--backbones ...] [--quick]

On the stand-in data (../shared/data/tinyimagenet100-32: real photos in CIFAR-100's format, NOT
CIFAR-100: its accuracies are not CIFAR-100 accuracies), one per-class subset and one split, every
contender runs through the real CLI (run_search.py in a subprocess, its own local Ray):
  (a) the search as a user runs it: warm start from the recipes, TPE, ASHA, --time-budget B
  (b) the same with --warm-start none
  (c) random search (Optuna's RandomSampler) with ASHA, --warm-start none, budget B
  (d) each pretrained recipe's procedure on each backbone, its epochs scaled into the same
      per-trial budget, all run to the end (FIFO, no time limit): what a careful person tries
Each contender's winner (best val_acc at its best epoch) is retrained on train+val and tested once
(`analyze.py`, as a user does). Prints a markdown table (paste it into BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, WEIGHTS, command_line, machine, md_table, run_cli  # noqa: E402
from trainable import atomic  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--weights-dir", default=str(WEIGHTS))
    p.add_argument("--budget", default="10m", help="wall-clock budget B of (a), (b) and (c)")
    p.add_argument("--subset", type=int, default=10, help="training images per class (train+val)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--max-epochs", type=int, default=3, help="epochs per trial over all stages")
    p.add_argument("--backbones", default="tf_efficientnet_lite0", help="the space's backbones to allow")
    p.add_argument("--cpus-per-trial", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contenders", default="d,a,b,c", help="which to run, in this order")
    p.add_argument("--work-dir", default="", help="its runs/ folder is emptied first (default /tmp/duel, "
                                                  "/tmp/duel-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 minute budgets, 3 per class, 2 epochs, 64 px")
    a = p.parse_args(argv)
    if a.quick:
        a.budget, a.subset, a.max_epochs = "60s", 3, 2
    a.work_dir = a.work_dir or ("/tmp/duel-quick" if a.quick else "/tmp/duel")
    return a


def recipe_count(a: argparse.Namespace) -> int:
    """How many recipe points the warm start (and so contender d) has in this setting."""
    from spaces import Options, get_space
    from spaces.warm_start import recipe_points
    space = get_space("cpu")
    backbones = tuple(b for b in a.backbones.split(",") if b)
    base = {"pretrained": True, "weights_dir": a.weights_dir, "seed": a.seed, "compile": False}
    fixed = {"input_size": "64"} if a.quick else {}
    return len(recipe_points(space, Options(backbones, a.max_epochs), base, fixed)[0])


def contender_args(name: str, a: argparse.Namespace, n_recipes: int) -> list[str]:
    common = ["--gpus", "0", "--space", "cpu", "--backbones", a.backbones, "--max-epochs", str(a.max_epochs),
              "--subset", str(a.subset), "--val-fraction", str(a.val_fraction), "--seed", str(a.seed),
              "--cpus-per-trial", str(a.cpus_per_trial), "--data-dir", a.data_dir, "--weights-dir", a.weights_dir,
              "--storage-path", str(Path(a.work_dir) / "runs"), "--name", name]
    if a.quick:
        common += ["--set", "input_size=64"]
    return common + {
        "a": ["--time-budget", a.budget],
        "b": ["--time-budget", a.budget, "--warm-start", "none"],
        "c": ["--time-budget", a.budget, "--warm-start", "none", "--sampler", "random"],
        "d": ["--warm-start", "recipes", "--num-samples", str(n_recipes), "--scheduler", "fifo"],
    }[name]


def summarise(exp: Path, wall: float) -> dict:
    from analysis.experiment import load_trials, rank
    trials = load_trials(exp)
    ranked = rank(trials)
    best = ranked[0] if ranked else None
    rows = [r for t in trials for r in t.results]
    return {"wall_s": wall, "trials": len(trials), "epochs": sum(t.epochs_run for t in trials),
            "best_val_acc": float(best.best["val_acc"]) if best else None,
            "best_trial": best.trial_id if best else "", "best_name": _name(best) if best else "",
            "first_result_ts": min((r["timestamp"] for r in rows if "timestamp" in r), default=None)}


def _name(t) -> str:
    """A trial's warm-start recipe name (from the experiment's Optuna study), else its key
    parameters: backbone, input size, stage epochs, optimizer."""
    import optuna

    from analysis.study import STUDY_NAME, WARM_CONFIG, study_url
    c = t.config
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=study_url(t.path.parent))
        for ot in study.trials:
            if ot.user_attrs.get(WARM_CONFIG) == c:
                return "recipe " + ot.user_attrs["warm_start"]
    except Exception:  # noqa: BLE001 - no study: fall back to the parameters
        pass
    return (f"{c['backbone'].replace('tf_efficientnet_', '')} {c['input_size']} px, stages "
            f"{c['stage1_epochs']}/{c['stage2_epochs']}/{c['stage3_epochs']}, {c['optimizer']}")


def first_beat(exp: Path, threshold: float, start: float) -> float | None:
    """Seconds after `start` at which a trial of `exp` first reported val_acc > threshold."""
    from analysis.experiment import load_trials
    times = [r["timestamp"] for t in load_trials(exp) for r in t.results
             if isinstance(r.get("val_acc"), float) and r["val_acc"] > threshold and r.get("status", "ok") == "ok"]
    return min(times) - start if times else None


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    a.command = command_line("duel.py", argv)
    work = Path(a.work_dir)
    if (work / "runs").exists():
        import shutil
        shutil.rmtree(work / "runs")
    n_recipes = recipe_count(a)
    names = [c.strip() for c in a.contenders.split(",") if c.strip()]
    results, t_all = {}, time.time()
    for name in names:
        print(f"[duel] contender {name} ...", flush=True)
        exp = work / "runs" / name
        start = time.time()
        wall = run_cli("run_search.py", contender_args(name, a, n_recipes), work / "logs" / f"{name}.log")
        results[name] = {**summarise(exp, wall), "start": start}
        print(f"[duel]   search {wall:.0f} s, {results[name]['trials']} trials, best val_acc "
              f"{results[name]['best_val_acc']}", flush=True)
        r_wall = run_cli("analyze.py", [str(exp)], work / "logs" / f"{name}-analyze.log")
        m = json.loads((exp / "analysis" / "test_metrics.json").read_text())
        results[name].update(test_acc=m["test_acc"], retrain_s=r_wall, test_images=m["test_images"],
                             retrain_epochs=m["epochs"])
        print(f"[duel]   retrain + test {r_wall:.0f} s: test_acc {m['test_acc']:.4f}", flush=True)
    if "a" in results and "d" in results and results["d"]["best_val_acc"] is not None:
        results["a"]["beat_recipes_after_s"] = first_beat(work / "runs" / "a", results["d"]["best_val_acc"],
                                                          results["a"]["start"])
    atomic.write_text(work / "duel.json", json.dumps(results, indent=1) + "\n")
    print("\n" + markdown(a, results, n_recipes, time.time() - t_all))
    return 0


LABELS = {"a": "(a) search as users run it: warm start + TPE + ASHA",
          "b": "(b) same, --warm-start none", "c": "(c) random search + ASHA",
          "d": "(d) every recipe's procedure, run to the end"}


def markdown(a: argparse.Namespace, results: dict, n_recipes: int, total_s: float) -> str:
    rows = [[LABELS[k], f"{r['wall_s']:.0f} s", r["trials"], r["epochs"],
             f"{100 * r['best_val_acc']:.1f} %" if r["best_val_acc"] is not None else "-", r["best_name"],
             f"{100 * r['test_acc']:.1f} %", f"{r['retrain_s']:.0f} s"] for k, r in sorted(results.items())]
    lines = [f"- Command: `{a.command}`, started "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(time.time() - total_s))} (took {total_s / 60:.1f} min)",
             f"- Machine: {machine()}",
             f"- Data: the stand-in `{a.data_dir}` (ImageNet photos in CIFAR-100's format; **not CIFAR-100**: "
             f"these accuracies are not CIFAR-100 accuracies), `--subset {a.subset}` per class, val fraction "
             f"{a.val_fraction}, seed {a.seed}; winners retrained on train+val and tested once on the test file.",
             f"- Every trial: `--space cpu`, backbones {a.backbones}, {a.max_epochs} epochs, "
             f"{a.cpus_per_trial} CPU per trial; (d) ran the {n_recipes} recipe points.", "",
             md_table(["contender", "budget used", "trials", "epochs", "best val_acc", "winner", "test_acc",
                       "retrain+test"], rows)]
    if "beat_recipes_after_s" in results.get("a", {}):
        t = results["a"]["beat_recipes_after_s"]
        lines += ["", f"- (a) first reported a val_acc above the best recipe's "
                      f"({100 * results['d']['best_val_acc']:.1f} %): "
                      + (f"{t:.0f} s after it started." if t is not None else "never, within its budget.")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
