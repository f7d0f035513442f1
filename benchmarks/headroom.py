"""python benchmarks/headroom.py [--subset 20] [--max-epochs 3] [--seeds 0,1]: is a better fine-tune one change away from
the best recipe? It and its one-change neighbours trained in-process, scored on val and the whole test file (stand-in)."""
import sys
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import Invocation, Results, listed, md_table, parser, split, timed_trial
from spaces import recipe_config
from spaces.warm_start import fit_epochs
from trainable.augment import normalisation_of
from trainable.config import TrialConfig
from trainable.data import load_cifar100
from trainable.loop import Precision, evaluate
from trainable.trial import to_device

HEAD = ["#", "change", "val_acc %", "test_acc %", "test vs base (pts)", "test per seed", "train time"]
SHOWN = ("backbone", "stage1_epochs", "stage1_lr", "optimizer", "schedule", "plateau_patience", "early_stop_patience",
         "batch_size", "input_size", "augment")


def neighbours(base: dict) -> list[tuple[str, dict]]:
    """(label, config changes) for the base and its one-change neighbours; `base` is a complete config."""
    lr, sizes = base["stage1_lr"], [64, 96, 128, 160, 224, 288]
    i = sizes.index(base["input_size"]) if base["input_size"] in sizes else 4
    last1 = {"stage3_epochs": 0, "stage1_epochs": base["stage1_epochs"] + base["stage2_epochs"] - 1, "stage2_epochs": 1}
    return [("base (the recipe)", {}),
            ("head lr x3", {"stage1_lr": lr * 3}), ("head lr /3", {"stage1_lr": lr / 3}),
            ("head lr x10", {"stage1_lr": lr * 10}),
            ("label smoothing 0.1", {"label_smoothing": 0.1}),
            ("weight decay 1e-4", {"weight_decay": 1e-4}), ("weight decay 1e-2", {"weight_decay": 1e-2}),
            (f"input {sizes[i - 1]} px", {"input_size": sizes[i - 1]}),
            (f"input {sizes[min(i + 1, 5)]} px (outside the space)", {"input_size": sizes[min(i + 1, 5)]}),
            ("cosine, no plateau/early stop", {"schedule": "cosine", "warmup_frac": 0.1, "plateau_patience": 0,
                                               "early_stop_patience": 0}),
            ("constant, no plateau/early stop", {"plateau_patience": 0, "early_stop_patience": 0}),
            ("batch 32", {"batch_size": 32}), ("batch 128", {"batch_size": 128}),
            ("top 1 block, last epoch, lr 1e-4", {**last1, "unfreeze_depth": 1, "stage2_lr": 1e-4}),
            ("top 2 blocks, last epoch, lr 1e-4", {**last1, "unfreeze_depth": 2, "stage2_lr": 1e-4}),
            ("top 2 blocks, last epoch, lr 1e-3", {**last1, "unfreeze_depth": 2, "stage2_lr": 1e-3}),
            ("light aug (strength 0.25)", {"augment": "", "aug_strength": 0.25}),
            ("next bigger backbone (lite1)", {"backbone": "tf_efficientnet_lite1"})]


def parse(argv: list[str] | None):
    p = parser(__doc__)
    p.add_argument("--subset", type=int, default=20, help="training images per class (train+val)")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--max-epochs", type=int, default=3, help="the recipe's epochs are fitted into this budget")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--recipe", default="efficientnetv2_frozen")
    p.add_argument("--seeds", type=listed(int), default="0", help="comma-separated: one split and one training seed each")
    p.add_argument("--only", type=listed(int), default="", help="comma-separated row numbers to run, in that order (default all)")
    p.add_argument("--out", default="/tmp/headroom.json", help="results so far, rewritten after every run")
    return p.parse_args(argv)


def run_one(cfg: dict, data, test) -> dict:
    """Train `cfg` to the end: its best val_acc and its last epoch's test_acc."""
    run = timed_trial(cfg, data.train, data.val)
    ok = [r for r in run.rows if r.get("status", "ok") == "ok" and "val_acc" in r]
    if run.net is None or not ok:
        return {"status": run.last.get("status", "failed"), "train_s": run.wall_s}
    mean, std = normalisation_of(run.net.backbone)
    dev = next(run.net.parameters()).device
    with torch.no_grad():
        ev = evaluate(run.net, *to_device(test, dev), input_size=cfg["input_size"], mean=mean, std=std,
                      batch_size=256, prec=Precision.for_device(dev, cfg["backbone"], cfg["precision"]))
    return {"status": "ok", "val_acc": max(r["val_acc"] for r in ok), "last_val_acc": ok[-1]["val_acc"],
            "test_acc": ev["acc"], "epochs": len(ok), "train_s": run.wall_s}


def main(argv: list[str] | None = None) -> int:
    a, run = parse(argv), Invocation("headroom.py", argv)
    base = recipe_config(a.recipe, base={"pretrained": True, "weights_dir": a.weights_dir, "compile": False})
    base = fit_epochs({**base, "backbone": a.backbone}, a.max_epochs)
    cands, results = neighbours(base), Results(a.out)
    test = load_cifar100(a.data_dir, splits=("test",), download=False).test
    for seed in a.seeds:
        data = split(a, a.subset, a.val_fraction, seed)
        for i in a.only or range(len(cands)):  # --only: in that order
            label, change = cands[i]
            if (key := f"{seed}:{label}") not in results:
                print(f"[headroom] seed {seed} #{i} {label} ...", flush=True)
                cfg = TrialConfig.from_dict({**base, **change, "seed": seed}).to_dict()
                results[key] = {**run_one(cfg, data, test), "row": i, "label": label, "seed": seed}
                print(f"[headroom]   {results[key]}", flush=True)
                results.save()
    print("\n" + markdown(a, run, base, cands, results, a.seeds))
    return 0


def markdown(a, run: Invocation, base: dict, cands: list, results: dict, seeds: list[int]) -> str:
    def cell(seed: int, label: str, k: str) -> float | None:  # a finished run's value
        r = results.get(f"{seed}:{label}", {})
        return r.get(k) if r.get("status") == "ok" else None

    def mean(vs: list) -> float | None:
        return fmean(vs) if (vs := [v for v in vs if v is not None]) else None

    def pct(v: float | None) -> str:
        return f"{100 * v:.1f}" if v is not None else "-"

    rows = []
    for i, (label, _change) in enumerate(cands):
        tests = [cell(s, label, "test_acc") for s in seeds]
        diffs = [t - b for t, b in zip(tests, (cell(s, cands[0][0], "test_acc") for s in seeds)) if None not in (t, b)]
        secs = mean([results.get(f"{s}:{label}", {}).get("train_s") for s in seeds])
        rows.append([i, label, pct(mean([cell(s, label, "val_acc") for s in seeds])), pct(mean(tests)),
                     f"{100 * fmean(diffs):+.1f}" if diffs else "-", " ".join(pct(t) for t in tests),
                     f"{secs:.0f} s" if secs else "-"])
    return "\n".join([
        run.header(),
        f"- Data: the stand-in (ImageNet photos in CIFAR-100's format; **not CIFAR-100**), `--subset {a.subset}` "
        f"per class, val fraction {a.val_fraction}, seeds {','.join(map(str, seeds))}: trained on the train split, "
        f"val_acc on the val split (best epoch), test_acc on the whole test file (last epoch).",
        f"- Base: recipe `{a.recipe}` fitted into {a.max_epochs} epochs: {({k: base[k] for k in SHOWN})}", "",
        md_table(HEAD, rows)])


if __name__ == "__main__":
    sys.exit(main())
