"""python benchmarks/feature_cache.py [--parts epoch,recipe,search] [--quick]: what the frozen-feature
cache (trainable/features.py) saves. Prints markdown tables for BENCHMARKS.md:

  epoch   head-only epochs of lite0 through run_trial, uncached (CIFAR_TUNE_FEATURE_CACHE=off)
          and cached, at 64, 128 and 224 px: an epoch after the first (training + validation),
          the first cached epoch's extraction, and a second trial's load of the same features
  recipe  the efficientnetv2_frozen recipe point as the duel runs it (lite0, --subset 20, val
          fraction 0.25, 224 px, 3 epochs: spaces.warm_start.fit_epochs), run_trial's wall time
          uncached and cached (from an empty cache)
  search  run_search.py: 8 trials of one backbone that vary only head hyper-parameters
          (stage1_lr and the head), uncached and cached, wall time of the whole search

Each run starts from an empty cache folder (CIFAR_TUNE_CACHE in a temporary directory). Trials
run on 1 thread, as a `--cpus-per-trial 1` trial does.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import BACKBONE, DATA, WEIGHTS, command_line, machine, md_table, run_cli  # noqa: E402

SWITCH = "CIFAR_TUNE_FEATURE_CACHE"


def timed_trial(config: dict, train, val, cache: str, switch: str) -> tuple[list[dict], list[float], float]:
    """run_trial with the cache `switch`ed and rooted at `cache`: (its rows, the wall time of each
    epoch (report to report; the first from the call), the whole call's wall time)."""
    from trainable.trial import run_trial
    os.environ.update({SWITCH: switch, "CIFAR_TUNE_CACHE": cache})
    rows, stamps = [], []
    t0 = time.perf_counter()
    run_trial(config, train, val, lambda m, _c: (rows.append(m), stamps.append(time.perf_counter())),
              checkpoint=False)
    wall = time.perf_counter() - t0
    return rows, [b - a for a, b in zip([t0] + stamps, stamps)], wall


def part_epoch(a, data) -> str:
    out = []
    for size in a.sizes:
        cfg = {"backbone": BACKBONE, "weights_dir": str(WEIGHTS), "stage3_epochs": 0, "stage1_epochs": 2, "stage2_epochs": 0,
               "input_size": size, "batch_size": 64, "aug_strength": 0.0, "optimizer": "adamw", "stage1_lr": 1e-3}
        with tempfile.TemporaryDirectory() as cache:
            off, off_t, _ = timed_trial(cfg, data.train, data.val, cache, "off")
            built, built_t, _ = timed_trial(cfg, data.train, data.val, cache, "on")
            hit, hit_t, _ = timed_trial(cfg, data.train, data.val, cache, "on")
        assert [r["feature_cache"] for r in built] == ["built", "hit"] and hit[0]["feature_cache"] == "hit"
        ratio = built_t[1] / off_t[1]
        out.append([f"{size} px", f"{off_t[1]:.1f} s", f"{built_t[1]:.3f} s", f"{ratio:.1%}",
                    "yes" if ratio <= 0.05 else "**NO**", f"{built[0]['feature_seconds']:.1f} s",
                    f"{hit[0]['feature_seconds']:.2f} s",
                    f"{abs(built[1]['val_loss'] - off[1]['val_loss']):.1e}"])
        print(md_table(EPOCH_HEAD, out[-1:]), flush=True)
    return md_table(EPOCH_HEAD, out)


EPOCH_HEAD = ["input", "uncached epoch 2", "cached epoch 2", "cached / uncached", "≤ 5 %",
              "extraction (first trial, epoch 1)", "load (second trial)", "|Δ val_loss| epoch 2"]


def part_recipe(a) -> str:
    from spaces import recipe_config
    from spaces.warm_start import fit_epochs
    from trainable.data import prepare_search_data
    data = prepare_search_data(a.data_dir, subset=a.recipe_subset, val_fraction=0.25, seed=0, download=False)
    cfg = fit_epochs(recipe_config("efficientnetv2_frozen", {"backbone": BACKBONE}, {"weights_dir": str(WEIGHTS)}),
                     a.recipe_epochs)
    cfg["input_size"] = a.recipe_size
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for switch in ("off", "on"):
            res, _, wall = timed_trial(cfg, data.train, data.val, cache, switch)
            rows.append([switch, f"{wall:.0f} s", len(res), f"{res[-1]['val_acc']:.1%}",
                         ", ".join(r["feature_cache"] for r in res)])
            print(md_table(RECIPE_HEAD, rows[-1:]), flush=True)
    return (md_table(RECIPE_HEAD, rows) + f"\n\nwall time cached / uncached: "
            f"{float(rows[1][1][:-2]) / float(rows[0][1][:-2]):.2f}; config: stage1_epochs {cfg['stage1_epochs']}, "
            f"input_size {cfg['input_size']}, batch {cfg['batch_size']}, {len(data.train)} training and "
            f"{len(data.val)} validation images")


RECIPE_HEAD = ["feature cache", "run_trial wall", "epochs", "last val_acc", "feature_cache per epoch"]


def part_search(a, work: Path) -> str:
    from analysis.experiment import load_trials
    rows = []
    for switch in ("off", "on"):
        with tempfile.TemporaryDirectory() as cache:
            name = f"heads-{switch}"
            args = ["--space", "tiny", "--backbones", BACKBONE, "--weights-dir", WEIGHTS, "--warm-start", "none",
                    "--num-samples", 8, "--max-concurrent", 1, "--cpus-per-trial", 1, "--scheduler", "fifo",
                    "--subset", a.search_subset, "--data-dir", a.data_dir, "--seed", 0, "--max-epochs", 3,
                    "--storage-path", work / "runs", "--name", name]
            for kv in ("stage3_epochs=0", "stage1_epochs=3", "stage2_epochs=0", f"input_size={a.search_size}",
                       "batch_size=64", "aug_strength=0", "unfreeze_depth=1", "stage2_lr=0.001"):
                args += ["--set", kv]
            env_before = dict(os.environ)
            os.environ.update({SWITCH: switch, "CIFAR_TUNE_CACHE": cache})
            try:
                wall = run_cli("run_search.py", args, work / "logs" / f"{name}.log")
            finally:
                os.environ.clear()
                os.environ.update(env_before)
            trials = load_trials(work / "runs" / name)
            per = [sum(r["time_this_iter_s"] for r in t.results) for t in trials]
            status = sorted({r["feature_cache"] for t in trials for r in t.results})
            rows.append([switch, f"{wall:.0f} s", len(trials), f"{sum(per):.0f} s",
                         f"{max(t.best['val_acc'] for t in trials if t.best):.1%}", ", ".join(status)])
            print(md_table(SEARCH_HEAD, rows[-1:]), flush=True)
    return (md_table(SEARCH_HEAD, rows) + f"\n\nwall time cached / uncached: "
            f"{float(rows[1][1][:-2]) / float(rows[0][1][:-2]):.2f}")


SEARCH_HEAD = ["feature cache", "search wall", "trials", "sum of the trials' epochs", "best val_acc",
               "feature_cache values seen"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="epoch,recipe,search")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes and subsets, not a record")
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--work-dir", default="")
    ap.add_argument("--epoch-subset", type=int, help="images per class for the epoch part (default 10)")
    ap.add_argument("--recipe-subset", type=int, help="images per class for the recipe part (default 20, the duel's)")
    ap.add_argument("--search-subset", type=int, help="images per class for the search part (default 10)")
    ap.add_argument("--search-size", type=int, help="input size of the search part (default 96)")
    a = ap.parse_args(argv)
    a.sizes, epoch_subset = ((32,), 2) if a.quick else ((64, 128, 224), 10)
    recipe_subset, a.recipe_size, a.recipe_epochs = (2, 32, 2) if a.quick else (20, 224, 3)
    search_subset, search_size = (2, 32) if a.quick else (10, 96)
    a.epoch_subset = a.epoch_subset or epoch_subset
    a.recipe_subset = a.recipe_subset or recipe_subset
    a.search_subset, a.search_size = a.search_subset or search_subset, a.search_size or search_size
    torch.set_num_threads(1)
    t0 = time.time()
    print(f"- Command: `{command_line('feature_cache.py', argv)}`, started "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load {os.getloadavg()[0]:.2f}")
    print(f"- Machine: {machine()}; 1 torch thread\n", flush=True)
    parts = a.parts.split(",")
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="feature-cache-"))
    out = []
    if "epoch" in parts:
        from trainable.data import prepare_search_data
        data = prepare_search_data(a.data_dir, subset=a.epoch_subset, val_fraction=0.1, seed=0, download=False)
        out.append(f"Head-only epochs, {BACKBONE}, `--subset {a.epoch_subset}` ({len(data.train)} training, "
                   f"{len(data.val)} validation images), batch 64, flip only, AdamW:\n\n" + part_epoch(a, data))
    if "recipe" in parts:
        out.append(f"The efficientnetv2_frozen recipe point in the duel setting ({BACKBONE}, `--subset "
                   f"{a.recipe_subset}`, val fraction 0.25, {a.recipe_size} px, {a.recipe_epochs} epochs):\n\n"
                   + part_recipe(a))
    if "search" in parts:
        out.append(f"A search of 8 trials on {BACKBONE} varying only stage1_lr and the head (flat or "
                   f"coarse_to_fine), 3 head-only epochs at {a.search_size} px, `--subset {a.search_subset}`, "
                   f"FIFO, one trial at a time, 1 CPU each; logs in {work / 'logs'}:\n\n" + part_search(a, work))
    print(f"\n- took {time.time() - t0:.0f} s; load at the end {os.getloadavg()[0]:.2f}\n")
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
