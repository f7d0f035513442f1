"""python benchmarks/duel.py [--seeds 0,1,2] [--contenders d,a@1,a@0.5,c@1]: the search against every recipe point run
to the end (d) at multiples of (d)'s wall time, over seeds, through run_search.py; winners tested once by analyze.py;
mean test accuracy, paired difference to (d) with its 95 % t-interval. Stand-in data (NOT CIFAR-100) by default; real
CIFAR-100: `--data-dir DIR --weights-dir '' --gpus N --space default --subset 0`. WORK/duel.json: a re-run resumes."""
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scipy import stats

from analysis.experiment import load_trials, rank
from analysis.outcome import on_a_fraction
from analysis.study import MOVE_ATTR, by_trial_id, load_study
from planning.settings import SearchSettings
from benchmarks.common import DATA, Invocation, Results, flags, listed, md_table, parser, run_cli, split
from report.plots import figure, save
from spaces import get_space, narrow
from spaces.warm_start import recipe_points
from trainable.cache import ENV, cache_root
from trainable.config import split_assignment
from trainable.errors import UserError

USER_CACHE = cache_root()  # before cold_cache points CIFAR_TUNE_CACHE at a run's own folder
# each contender's run_search.py flags besides the budget; (a) is the search as users run it
FLAGS = {"a": [], "a-local": ["--sampler", "tpe"], "a-screen": ["--screen", "off"],
         "b": ["--warm-start", "none"], "c": ["--warm-start", "none", "--sampler", "random"]}
LABELS = {"d": "(d) every recipe point, run to the end", "a": "(a) the search as users run it",
          "a-local": "(a) without the local search (TPE)", "a-screen": "(a) without the screen",
          "b": "(b) (a) with --warm-start none", "c": "(c) random search + ASHA"}
HEAD = ["contender", "seeds", "test_acc % (mean)", "per seed", "vs (d), pts [95 % CI]", "wall", "trials", "epochs",
        "first beat (d)'s best val_acc", "winners"]


def parse(argv: list[str] | None):
    p = parser(__doc__, work_dir="/tmp/duel", work_help="runs/, logs/ and duel.json (kept: a re-run resumes)",
               quick="smoke run: 3 per class, 2 epochs, 64 px, one seed")
    p.add_argument("--seeds", type=listed(int), default="0,1,2", help="one split (and searcher/trial seed) per seed")
    p.add_argument("--contenders", default="d,a@1,a@0.5,c@1", help="d first; others as NAME@MULTIPLE of (d)'s wall "
                   "time: " + "; ".join(f"{k} = {v}" for k, v in LABELS.items() if k != "d"))
    p.add_argument("--subset", type=int, default=10, help="training images per class (train+val); 0: all")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--max-epochs", type=int, default=3, help="epochs per trial over all stages")
    p.add_argument("--backbones", default="tf_efficientnet_lite0", help="the space's backbones to allow")
    p.add_argument("--space", default="cpu", help="run_search.py's --space: cpu, or default (the GPU space)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs for each contender's search (one trial per GPU)")
    p.add_argument("--cpus-per-trial", type=int, default=None, help="default 1 on the CPU, run_search.py's with GPUs")
    p.add_argument("--input-size", type=int, default=0,
                   help="every trial (recipes too) at this input size, as `--set input_size=N` (0: each its own)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a value for every trial, recipes too (run_search.py's --set; repeatable): "
                        "stage1_epochs=1 makes every trial a fine-tune")
    p.add_argument("--table-only", action="store_true", help="run nothing: the table and plot of what WORK/duel.json holds")
    p.add_argument("--plot", default="", help="PNG of incumbent val_acc against wall time (default WORK/duel.png)")
    a = p.parse_args(argv)
    if a.quick:
        a.subset, a.max_epochs, a.seeds, a.input_size = 3, 2, a.seeds[:1], a.input_size or 64
    a.plot = a.plot or str(Path(a.work_dir) / "duel.png")
    a.cpus_per_trial = a.cpus_per_trial or (None if a.gpus else 1)
    try:
        a.sets = dict(split_assignment(kv) for kv in a.set) | ({"input_size": str(a.input_size)} if a.input_size else {})
    except UserError as e:
        p.error(str(e))
    stand_in = Path(a.data_dir).resolve() == DATA.resolve()  # any other folder is named, never called CIFAR-100
    a.data_label = "stand-in data, not CIFAR-100" if stand_in else f"data: {Path(a.data_dir).name}"
    return a


def contenders(spec: str) -> list[tuple[str, float]]:
    """"a@1,c@0.5" -> [("d", 1.0), ("a", 1.0), ("c", 0.5)]: (d) always runs, first: it sets the budget."""
    out = [("d", 1.0)]
    for item in (i.strip() for i in spec.split(",") if i.strip()):
        name, _, mult = item.partition("@")
        if name != "d" and name not in FLAGS:
            raise SystemExit(f"error: unknown contender {name!r}: choose d or one of {', '.join(FLAGS)}")
        out += [] if name == "d" else [(name, float(mult or 1))]
    return out


def key(name: str, mult: float) -> str:
    return "d" if name == "d" else f"{name}@{mult:g}"


def cli_args(name: str, budget_s: float | None, a, seed: int, exp: Path) -> list[str]:
    common = dict(gpus=a.gpus, space=a.space, backbones=a.backbones or None, max_epochs=a.max_epochs,
                  subset=a.subset or None, val_fraction=a.val_fraction, seed=seed, cpus_per_trial=a.cpus_per_trial,
                  data_dir=a.data_dir, weights_dir=a.weights_dir or None, storage_path=exp.parent, name=exp.name)
    sets = a.sets
    if name == "d":  # every recipe point whole: the warm start alone, FIFO, no screen
        return flags(sets, **common, warm_start="recipes", num_samples=recipe_count(a, seed), scheduler="fifo", screen="off")
    return flags(sets, **common, time_budget=f"{budget_s:.0f}s") + FLAGS[name]


def recipe_count(a, seed: int) -> int:
    base = {"pretrained": True, "weights_dir": a.weights_dir, "seed": seed, "compile": False}
    space = get_space(a.space)
    fixed = SearchSettings(set=[f"{k}={v}" for k, v in a.sets.items()]).fixed()
    return len(recipe_points(space, narrow(space, a.backbones, a.max_epochs), base, fixed)[0])


def incumbent_curve(trials: list, start: float) -> list[tuple[float, float]]:
    """(seconds after `start`, best full-fidelity val_acc so far) at each improvement."""
    curve, best = [], -1.0
    for ts, v in sorted((r["timestamp"] - start, r["val_acc"]) for t in trials for r in t.results
                        if isinstance(r.get("val_acc"), float) and r.get("status", "ok") == "ok"
                        and not on_a_fraction(t.config)):
        if v > best:
            best = v
            curve.append((ts, v))
    return curve


def lineage(ot, by_number: dict) -> str:
    """A trial's chain of local moves back to its recipe or draw: 'recipe efficientnetv2_frozen + stage1_lr, weight_decay'."""
    changed = []
    while ot is not None and "warm_start" not in ot.user_attrs:
        m = ot.system_attrs.get(MOVE_ATTR)
        if not m:
            return f"trial {ot.number} (the searcher's own draw)" + (f" + {', '.join(changed)}" if changed else "")
        changed = [", ".join(m["changed"])] + changed
        ot = by_number.get(m["parent"])
    origin = "recipe " + ot.user_attrs["warm_start"] if ot is not None else "?"
    return origin + (f" + {', '.join(changed)}" if changed else "")


def winner(exp: Path) -> str:
    """How the trial the search exported (best_config.json: the one analyze.py tested) was reached (`lineage`), else
    (no study) its key parameters; '' without one. Not today's rank: a later rule can prefer a trial never tested."""
    trials = load_trials(exp)
    try:
        exported = json.loads((exp / "best_config.json").read_text())["trial_id"]
    except (OSError, ValueError, KeyError, TypeError):
        exported = None
    t = next((x for x in trials if x.trial_id == exported), None) or next(iter(rank(trials)), None)
    if t is None:
        return ""
    study = load_study(t.path.parent)
    trials = study.trials if study is not None else []
    if (ot := by_trial_id(trials).get(t.trial_id)) is not None:
        return lineage(ot, {o.number: o for o in trials})
    c = t.config
    return (f"{c['backbone'].replace('tf_efficientnet_', '')} {c['input_size']} px, stages "
            f"{c['stage1_epochs']}/{c['stage2_epochs']}/{c['stage3_epochs']}, {c['optimizer']}")


def run_dir(work: Path, seed: int, k: str) -> Path:
    return work / "runs" / f"s{seed}-{k.replace('@', '_')}"


def run_contender(name: str, mult: float, a, seed: int, results: Results, work: Path) -> None:
    k, runs = key(name, mult), results.setdefault(str(seed), {})
    if k in runs:
        return
    budget, exp = None if name == "d" else mult * runs["d"]["wall_s"], run_dir(work, seed, k)
    shutil.rmtree(exp, ignore_errors=True)  # a run cut off by an earlier stop of this script: run it again whole
    print(f"[duel] seed {seed} {k} " + (f"(budget {budget:.0f} s)" if budget else "") + " ...", flush=True)
    cold_cache(work / "cache" / exp.name)
    start = time.time()
    wall = run_cli("run_search.py", cli_args(name, budget, a, seed, exp), work / "logs" / f"{exp.name}.log")
    trials = load_trials(exp)
    best = next(iter(rank(trials)), None)
    r = {"wall_s": wall, "trials": len(trials), "epochs": sum(t.epochs_run for t in trials),
         "best_val_acc": float(best.best["val_acc"]) if best else None, "winner": winner(exp),
         "curve": incumbent_curve(trials, start)}
    r_wall = run_cli("analyze.py", [exp], work / "logs" / f"{exp.name}-analyze.log")
    m = json.loads((exp / "analysis" / "test_metrics.json").read_text())
    runs[k] = {**r, "test_acc": m["test_acc"], "retrain_s": r_wall, "budget_s": budget}
    print(f"[duel]   {wall:.0f} s, {r['trials']} trials, best val_acc {r['best_val_acc']}, test_acc "
          f"{m['test_acc']:.4f} ({r['winner']})", flush=True)
    results.save()


def cold_cache(folder: Path) -> None:
    """A feature cache of the run's own (no contender reuses another's features), with the measured step speeds in it."""
    speeds = USER_CACHE / "speed.json"
    folder.mkdir(parents=True, exist_ok=True)
    if speeds.exists() and not (folder / "speed.json").exists():
        shutil.copy2(speeds, folder / "speed.json")
    os.environ[ENV] = str(folder)


def main(argv: list[str] | None = None) -> int:
    a, run = parse(argv), Invocation("duel.py", argv)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results, cs = Results(work / "duel.json"), contenders(a.contenders)
    for seed in a.seeds:
        for name, mult in cs:
            if not a.table_only:
                run_contender(name, mult, a, seed, results, work)
            elif (exp := run_dir(work, seed, key(name, mult))).is_dir():  # named by today's lineage rule
                results.get(str(seed), {}).get(key(name, mult), {})["winner"] = winner(exp)
    plot(results, a.seeds, cs, Path(a.plot), a.data_label)
    print("\n" + markdown(a, run, results, a.seeds, cs))
    return 0


def paired(diffs: list[float]) -> str:
    """Mean paired difference in points with its 95 % t-interval (n >= 2)."""
    if len(diffs) < 2:
        return f"{100 * diffs[0]:+.1f}" if diffs else "-"
    ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    return f"{100 * statistics.fmean(diffs):+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}]"


def table_row(name: str, mult: float, runs: list[tuple[dict, dict]]) -> list:
    """One contender's row over its seeds; `runs` pairs each seed's result with (d)'s."""
    tests = [r["test_acc"] for r, _ in runs]
    mean = {k: statistics.fmean(r[k] for r, _ in runs) for k in ("wall_s", "trials", "epochs")}
    row = [LABELS[name], len(runs), f"{100 * statistics.fmean(tests):.1f}", " ".join(f"{100 * t:.1f}" for t in tests), "-",
           f"{mean['wall_s']:.0f} s", f"{mean['trials']:.1f}", f"{mean['epochs']:.1f}", "-",
           "; ".join(r["winner"] for r, _ in runs)]
    if name != "d":
        beats = [next((ts for ts, v in r["curve"] if v > d["best_val_acc"]), None) for r, d in runs]
        row[0] += f", {mult:g}x"
        row[4] = paired([r["test_acc"] - d["test_acc"] for r, d in runs])
        row[8] = ", ".join("never" if b is None else f"{b:.0f} s" for b in beats)
    return row


def markdown(a, run: Invocation, results: dict, seeds: list[int], cs: list) -> str:
    rows = []
    for name, mult in cs:
        k = key(name, mult)
        runs = [(results[str(s)][k], results[str(s)]["d"]) for s in seeds if k in results.get(str(s), {})]
        rows += [table_row(name, mult, runs)] if runs else []
    return "\n".join([
        run.header(),
        f"- Data: `{a.data_dir}` ({a.data_label}), `--subset {a.subset or 'all'}` per class, val fraction {a.val_fraction}"
        f"{split_sizes(a, seeds[0])}, seeds {','.join(map(str, seeds))} (one split each); winners retrained on train+val "
        f"(a winner whose early stopping or reduce-on-plateau reads val replays its search trial's decisions) and tested "
        f"once on the whole test file.",
        f"- Every trial: `--space {a.space}`, backbones {a.backbones or 'all of the space'}, {a.max_epochs} epochs, "
        f"{f'{a.gpus} GPUs in all' if a.gpus else f'{a.cpus_per_trial} CPU per trial'}"
        f"{''.join(f', {k}={v}' for k, v in a.sets.items())}; a contender's budget is a multiple of (d)'s wall "
        f"time on the same seed.", "", md_table(HEAD, rows)])


def split_sizes(a, seed: int) -> str:
    """" (N train / M val images)" of the first seed's split (the search's own rounding), or "" without the data."""
    try:
        d = split(a, a.subset or None, a.val_fraction, seed)
    except (UserError, OSError):
        return ""
    return f" ({len(d.train)} train / {len(d.val)} val images)"


def plot(results: dict, seeds: list[int], cs: list, path: Path, data_label: str) -> None:
    fig, axes = figure(5 * len(seeds), 3.6, nrows=1, ncols=len(seeds), squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        runs = results.get(str(seed), {})
        for i, (name, mult) in enumerate(cs):
            if (r := runs.get(key(name, mult))) and r["curve"]:  # colour by contender: a panel may lack one
                xs, ys = zip(*r["curve"])
                ax.step([*xs, r["wall_s"]], [100 * y for y in (*ys, ys[-1])], where="post", label=key(name, mult),
                        color=f"C{i}")
        if "d" in runs and runs["d"]["best_val_acc"] is not None:
            ax.axhline(100 * runs["d"]["best_val_acc"], color="grey", ls=":", lw=1)
        ax.set_title(f"seed {seed} ({data_label})", fontsize=9)
        ax.set(xlabel="wall time, s", ylabel="incumbent val_acc, %")
        ax.legend(fontsize=7)
    save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
