"""python benchmarks/rungs.py [--num-samples 12] [--max-epochs 4] [--subset 10] [--quick]: where should ASHA's first rung
be? Spearman of FIFO trials' val_acc at epoch 1 and at the stage-aware rung against their last epoch's."""
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml
from scipy.stats import spearmanr

from analysis.experiment import load_trials
from benchmarks.common import md_table, parse, parser, search
from search.searcher import stage_aware_grace
from spaces import get_space

# a new search's defaults; an --experiment brings its own (its search_settings.yaml)
OWN = {"num_samples": 12, "max_epochs": 4, "subset": 10, "backbones": "tf_efficientnet_lite0"}


def correlations(trials: list, rungs: list[int], last: int) -> dict[int, tuple[float, int]]:
    """{rung: (Spearman rho, trials)} between val_acc at the rung and at epoch `last`."""
    accs = [{int(row["epoch"]): row["val_acc"] for row in t.results if row.get("status", "ok") == "ok"} for t in trials]
    out = {}
    for r in rungs:
        pairs = [(acc[r], acc[last]) for acc in accs if r in acc and last in acc]
        rho = spearmanr(*zip(*pairs)).statistic if len(pairs) > 2 else float("nan")
        out[r] = (float(rho), len(pairs))
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, work_dir="/tmp/rungs", quick="4 trials, 3 images per class, 64 px")
    for k, v in OWN.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), help=f"default {v}")
    p.add_argument("--experiment", default="", help="measure an existing FIFO experiment (e.g. the duel's "
                                                     "contender d, /tmp/duel/runs/d) instead of running one")
    a, run = parse(p, "rungs.py", argv)
    if a.experiment and (given := [k for k in OWN if getattr(a, k) is not None]):
        print(f"error: {', '.join('--' + k.replace('_', '-') for k in given)}: --experiment measures that experiment's "
              f"own trials, epochs and data; leave them out", file=sys.stderr)
        return 2
    if a.experiment:  # its own epoch budget and trials
        exp = Path(a.experiment)
        saved = yaml.safe_load((exp / "search_settings.yaml").read_text())
        a.max_epochs, a.subset = saved["max_epochs"], saved["subset"]
        what = f"the FIFO experiment `{exp}` (its trials' own configs)"
    else:
        for k, v in OWN.items():
            setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
        if a.quick:
            a.num_samples, a.subset = 4, 3
        shutil.rmtree(Path(a.work_dir) / "runs" / "fifo", ignore_errors=True)  # a new FIFO search of random configs
        exp, _ = search(a, "fifo", {"input_size": 64} if a.quick else None, log=Path(a.work_dir) / "fifo.log", gpus=0,
                        space="cpu", backbones=a.backbones, max_epochs=a.max_epochs, subset=a.subset, val_fraction=0.2,
                        num_samples=a.num_samples, scheduler="fifo", sampler="random", warm_start="none", seed=1,
                        weights_dir=a.weights_dir)
        what = "random configs of the `cpu` space"
    grace = stage_aware_grace(get_space("cpu"), a.max_epochs)
    trials = load_trials(exp)
    rungs = sorted({1, grace})
    corr = correlations(trials, rungs, a.max_epochs)
    rows = [[f"epoch {r}" + (" (stage-aware, the default)" if r == grace else " (the old default)"), corr[r][1],
             f"{corr[r][0]:.2f}"] for r in rungs]
    print(run.header() + f"\n- {len(trials)} trials, {what}, all run to epoch {a.max_epochs} (FIFO), on the stand-in data "
          f"(not CIFAR-100), `--subset {a.subset}` per class, part held out for val_acc. The stage-aware rung for this "
          f"budget is epoch {grace} (search/searcher.py `stage_aware_grace`).\n\n"
          + md_table(["first rung at", "trials", "Spearman rho (rung val_acc vs final val_acc)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
