"""python benchmarks/feature_cache.py [--parts epoch,recipe,search] [--quick]: what the frozen-feature cache saves, off
(CIFAR_TUNE_FEATURE_CACHE=off) against on from an empty folder, on 1 thread: head-only epochs, the frozen recipe, a search."""
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from analysis.experiment import load_trials
from benchmarks.common import BACKBONE, listed, md_table, parse, parser, search, split, timed_trial, verdict
from spaces import recipe_config
from spaces.warm_start import fit_epochs
from trainable.cache import ENV
from trainable.features import SWITCH_ENV

EPOCH_HEAD = ["input", "uncached epoch 2", "cached epoch 2", "cached / uncached", "≤ 5 %",
              "extraction (first trial, epoch 1)", "load (second trial)", "|Δ val_loss| epoch 2"]
RECIPE_HEAD = ["feature cache", "run_trial wall", "epochs", "last val_acc", "feature_cache per epoch"]
SEARCH_HEAD = ["feature cache", "search wall", "trials", "sum of the trials' epochs", "best val_acc",
               "feature_cache values seen"]
FULL = dict(sizes=(64, 128, 224), epoch_subset=10, recipe_subset=20, recipe_size=224, recipe_epochs=3, search_subset=10,
            search_size=96)
QUICK = dict(sizes=(32,), epoch_subset=2, recipe_subset=2, recipe_size=32, recipe_epochs=2, search_subset=2, search_size=32)


def cache(switch: str, folder: str):
    """The feature cache `switch`ed and rooted at `folder` until the block ends (for run_trial and the CLIs it starts)."""
    return mock.patch.dict(os.environ, {SWITCH_ENV: switch, ENV: folder})


def part_epoch(a) -> str:
    data, rows = split(a, a.epoch_subset), []
    for size in a.sizes:
        cfg = {"backbone": BACKBONE, "weights_dir": a.weights_dir, "stage3_epochs": 0, "stage1_epochs": 2, "stage2_epochs": 0,
               "input_size": size, "batch_size": 64, "aug_strength": 0.0, "optimizer": "adamw", "stage1_lr": 1e-3}
        runs = []
        with tempfile.TemporaryDirectory() as folder:  # uncached, then a first trial builds the features, a second loads
            for switch in ("off", "on", "on"):
                with cache(switch, folder):
                    runs.append(timed_trial(cfg, data.train, data.val))
        off, built, hit = runs
        assert [r["feature_cache"] for r in built.rows] == ["built", "hit"] and hit.rows[0]["feature_cache"] == "hit"
        ratio = built.epoch_s[1] / off.epoch_s[1]
        rows.append([f"{size} px", f"{off.epoch_s[1]:.1f} s", f"{built.epoch_s[1]:.3f} s", f"{ratio:.1%}",
                     verdict(ratio <= 0.05), f"{built.rows[0]['feature_seconds']:.1f} s",
                     f"{hit.rows[0]['feature_seconds']:.2f} s",
                     f"{abs(built.rows[1]['val_loss'] - off.rows[1]['val_loss']):.1e}"])
        print(md_table(EPOCH_HEAD, rows[-1:]), flush=True)
    return (f"Head-only epochs, {BACKBONE}, `--subset {a.epoch_subset}` ({len(data.train)} training, {len(data.val)} "
            f"validation images), batch 64, flip only, AdamW:\n\n" + md_table(EPOCH_HEAD, rows))


def off_and_on(head: list[str], one) -> str:
    """`one()` -> (wall seconds, the row's other cells) uncached, then cached from an empty folder: the table and ratio."""
    rows, walls = [], []
    for switch in ("off", "on"):
        with tempfile.TemporaryDirectory() as folder, cache(switch, folder):
            wall, cells = one(switch)
        walls.append(wall)
        rows.append([switch, f"{wall:.0f} s", *cells])
        print(md_table(head, rows[-1:]), flush=True)
    return md_table(head, rows) + f"\n\nwall time cached / uncached: {walls[1] / walls[0]:.2f}"


def part_recipe(a) -> str:
    data = split(a, a.recipe_subset, 0.25)
    cfg = {**fit_epochs(recipe_config("efficientnetv2_frozen", {"backbone": BACKBONE}, {"weights_dir": a.weights_dir}),
                        a.recipe_epochs), "input_size": a.recipe_size}

    def one(_switch):
        run = timed_trial(cfg, data.train, data.val)
        return run.wall_s, [len(run.rows), f"{run.rows[-1]['val_acc']:.1%}", ", ".join(r["feature_cache"] for r in run.rows)]
    return (f"The efficientnetv2_frozen recipe point in the duel setting ({BACKBONE}, `--subset {a.recipe_subset}`, val "
            f"fraction 0.25, {a.recipe_size} px, {a.recipe_epochs} epochs):\n\n" + off_and_on(RECIPE_HEAD, one)
            + f"; config: stage1_epochs {cfg['stage1_epochs']}, input_size {cfg['input_size']}, batch {cfg['batch_size']}, "
            f"{len(data.train)} training and {len(data.val)} validation images")


def part_search(a) -> str:
    sets = {"stage3_epochs": 0, "stage1_epochs": 3, "stage2_epochs": 0, "input_size": a.search_size, "batch_size": 64,
            "aug_strength": 0, "unfreeze_depth": 1, "stage2_lr": 0.001}

    def one(switch):
        exp, wall = search(a, f"heads-{switch}", sets, space="tiny", backbones=BACKBONE, weights_dir=a.weights_dir,
                           warm_start="none", num_samples=8, max_concurrent=1, cpus_per_trial=1, scheduler="fifo",
                           subset=a.search_subset, seed=0, max_epochs=3)
        trials = load_trials(exp)
        return wall, [len(trials), f"{sum(r['time_this_iter_s'] for t in trials for r in t.results):.0f} s",
                      f"{max(t.best['val_acc'] for t in trials if t.best):.1%}",
                      ", ".join(sorted({r["feature_cache"] for t in trials for r in t.results}))]
    return (f"A search of 8 trials on {BACKBONE} varying only stage1_lr and the head (flat or coarse_to_fine), 3 "
            f"head-only epochs at {a.search_size} px, `--subset {a.search_subset}`, FIFO, one trial at a time, 1 CPU "
            f"each; logs in {Path(a.work_dir) / 'logs'}:\n\n" + off_and_on(SEARCH_HEAD, one))


PARTS = {"epoch": part_epoch, "recipe": part_recipe, "search": part_search}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, work_dir="", quick="a smoke run: tiny sizes and subsets, not a record")
    p.add_argument("--parts", type=listed(), default="epoch,recipe,search")
    p.add_argument("--epoch-subset", type=int, help="images per class for the epoch part (default 10)")
    p.add_argument("--recipe-subset", type=int, help="images per class for the recipe part (default 20, the duel's)")
    p.add_argument("--search-subset", type=int, help="images per class for the search part (default 10)")
    p.add_argument("--search-size", type=int, help="input size of the search part (default 96)")
    a, run = parse(p, "feature_cache.py", argv, FULL, QUICK)
    torch.set_num_threads(1)
    out = [part(a) for name, part in PARTS.items() if name in a.parts]
    print("\n" + run.header("; 1 torch thread") + "\n\n" + "\n\n".join(out))


if __name__ == "__main__":
    main()
