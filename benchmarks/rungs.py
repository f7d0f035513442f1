"""Where should ASHA's first rung be? The rank correlation between a rung's val_acc and the final
val_acc, over trials that all ran to the end.

    python benchmarks/rungs.py [--num-samples 12] [--max-epochs 4] [--subset 10] [--quick]

One FIFO search (run_search.py --scheduler fifo --sampler random --warm-start none: independent
random configs of the cpu space, every trial run to its last epoch) on the stand-in data (not
CIFAR-100). For each candidate rung r (epoch 1, the old default, and the stage-aware rung that
search/searcher.py derives), the Spearman rank correlation between the trials' val_acc at epoch r
and at their last epoch: how well a decision at r ranks the trials as their full runs do. Prints a
markdown table (paste it into BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, WEIGHTS, command_line, md_table, run_cli  # noqa: E402


def correlations(trials: list, rungs: list[int], last: int) -> dict[int, tuple[float, int]]:
    """{rung: (Spearman rho, trials)} between val_acc at the rung and at epoch `last`."""
    from scipy.stats import spearmanr
    out = {}
    for r in rungs:
        pairs = []
        for t in trials:
            acc = {int(row["epoch"]): row["val_acc"] for row in t.results if row.get("status", "ok") == "ok"}
            if r in acc and last in acc:
                pairs.append((acc[r], acc[last]))
        rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic if len(pairs) > 2 else float("nan")
        out[r] = (float(rho), len(pairs))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--weights-dir", default=str(WEIGHTS))
    # None = not given: an --experiment brings its own (its search_settings.yaml), a new search these
    p.add_argument("--num-samples", type=int, default=None, help="default 12")
    p.add_argument("--max-epochs", type=int, default=None, help="default 4")
    p.add_argument("--subset", type=int, default=None, help="default 10")
    p.add_argument("--backbones", default=None, help="default tf_efficientnet_lite0")
    p.add_argument("--work-dir", default="/tmp/rungs")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--experiment", default="", help="measure an existing FIFO experiment (e.g. the duel's "
                                                     "contender d, /tmp/duel/runs/d) instead of running one")
    a = p.parse_args(argv)
    own = {"--num-samples": a.num_samples, "--max-epochs": a.max_epochs, "--subset": a.subset,
           "--backbones": a.backbones}
    if a.experiment and any(v is not None for v in own.values()):
        given = ", ".join(k for k, v in own.items() if v is not None)
        print(f"error: {given}: --experiment measures that experiment's own trials, epochs and data; "
              f"leave them out", file=sys.stderr)
        return 2
    a.num_samples = 12 if a.num_samples is None else a.num_samples
    a.max_epochs = 4 if a.max_epochs is None else a.max_epochs
    a.subset = 10 if a.subset is None else a.subset
    a.backbones = a.backbones or "tf_efficientnet_lite0"
    if a.quick:
        a.num_samples, a.subset = 4, 3
    from analysis.experiment import load_trials
    from search.searcher import stage_aware_grace
    from spaces import get_space
    exp = Path(a.experiment or Path(a.work_dir) / "runs" / "fifo")
    if exp.exists() and not a.experiment:
        import shutil
        shutil.rmtree(exp)
    args = ["--gpus", "0", "--space", "cpu", "--backbones", a.backbones, "--max-epochs", str(a.max_epochs),
            "--subset", str(a.subset), "--val-fraction", "0.2", "--num-samples", str(a.num_samples),
            "--scheduler", "fifo", "--sampler", "random", "--warm-start", "none", "--seed", "1",
            "--data-dir", a.data_dir, "--weights-dir", a.weights_dir,
            "--storage-path", str(exp.parent), "--name", "fifo"] + (["--set", "input_size=64"] if a.quick else [])
    t0 = time.time()
    if a.experiment:  # its own epoch budget and trials
        import yaml
        saved = yaml.safe_load((exp / "search_settings.yaml").read_text())
        a.max_epochs, a.subset, a.backbones = saved["max_epochs"], saved["subset"], saved["backbones"]
        wall, what = 0.0, f"the FIFO experiment `{exp}` (its trials' own configs)"
    else:
        wall = run_cli("run_search.py", args, Path(a.work_dir) / "fifo.log")
        what = "random configs of the `cpu` space"
    grace = stage_aware_grace(get_space("cpu"), a.max_epochs)
    trials = load_trials(exp)
    rungs = sorted({1, grace})
    corr = correlations(trials, rungs, a.max_epochs)
    rows = [[f"epoch {r}" + (" (stage-aware, the default)" if r == grace else " (the old default)"), corr[r][1],
             f"{corr[r][0]:.2f}"] for r in rungs]
    print(f"- Command: `{command_line('rungs.py', argv)}`, started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))}"
          + ("" if a.experiment else f" (took {wall / 60:.1f} min)") + "\n"
          f"- {len(trials)} trials, {what}, all run to epoch {a.max_epochs} (FIFO), on the stand-in data (not "
          f"CIFAR-100), `--subset {a.subset}` per class, part held out for val_acc. The stage-aware rung for this "
          f"budget is epoch {grace} (search/searcher.py `stage_aware_grace`).\n\n"
          + md_table(["first rung at", "trials", "Spearman rho (rung val_acc vs final val_acc)"], rows))
    print(f"took {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
