"""python analyze.py runs/NAME: leaderboard, retrain the best config on train+val, test it once."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from trainable.errors import UserError


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("experiment", help="the experiment folder run_search.py wrote (STORAGE/NAME)")
    p.add_argument("--config", default="", help="retrain this config instead (a best_config.yaml)")
    p.add_argument("--data-dir", default="", help="folder holding cifar-100-python/ (default: the search's)")
    p.add_argument("--weights-dir", default=None, help="offline pretrained weights (default: the search's)")
    p.add_argument("--no-retrain", action="store_true", help="only summarise the search")
    return p.parse_args(argv)


def analyze(args: argparse.Namespace) -> Path:
    from search.export import export_best, leaderboard, load_trials, read_best_config, read_settings
    exp = Path(args.experiment).expanduser().resolve()
    trials = load_trials(exp) if exp.is_dir() else []
    if not exp.is_dir() or not (trials or (exp / "search_settings.yaml").exists()):
        raise UserError(f"{exp} is not an experiment folder: pass the STORAGE/NAME folder run_search.py wrote")
    settings = read_settings(exp)
    best = export_best(exp, trials)  # raises a clear error when no trial finished an epoch
    print(leaderboard(trials))
    print(f"\nbest: trial {best['trial_id']} val_acc {best['best_val_acc']:.4f} at epoch {best['best_epoch']}")
    out = exp / "analysis"
    if args.no_retrain:
        return _report(exp)
    config = read_best_config(Path(args.config)) if args.config else best["config"]
    if args.weights_dir is not None:
        config = {**config, "weights_dir": str(Path(args.weights_dir).resolve()) if args.weights_dir else ""}
    from trainable.data import prepare_final_data
    from trainable.final import retrain_and_test
    data_dir = args.data_dir or settings.get("data_dir") or "./data"
    train, test, fine_names, coarse_names = prepare_final_data(
        data_dir, subset=settings.get("subset"), seed=int(settings.get("seed", 0)))
    print(f"retraining on {len(train)} train+val images, then testing on {len(test)} ...")
    with _epoch_bar(config) as on_epoch:
        metrics = retrain_and_test(config, train, test, out, fine_names=fine_names,
                                   coarse_names=coarse_names, on_epoch=on_epoch)
    print(f"test_acc {metrics['test_acc']:.4f}  top5 {metrics['test_top5']:.4f}  "
          f"coarse {metrics['test_coarse_acc']:.4f}  -> {out}")
    return _report(exp)


@contextlib.contextmanager
def _epoch_bar(config: dict):
    """A progress bar over the retrain's epochs on a terminal; one line per epoch otherwise."""
    from tqdm import tqdm

    from trainable.config import TrialConfig
    bar = tqdm(total=TrialConfig.from_dict(config).total_epochs, unit="epoch", desc="retrain",
               disable=not sys.stderr.isatty())

    def on_epoch(m: dict) -> None:
        info = {"stage": m["stage"], "loss": f"{m['train_loss']:.3f}", "img/s": f"{m['images_per_sec']:.0f}"}
        bar.update(1)
        bar.set_postfix(info)
        if bar.disable:
            print(f"  epoch {m['epoch']} " + " ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    try:
        yield on_epoch
    finally:
        bar.close()


def _report(exp: Path) -> Path:
    from report import write_report
    print(f"report: {write_report(exp)}")
    return exp / "analysis"


def main(argv: list[str] | None = None) -> int:
    try:
        analyze(parse(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
