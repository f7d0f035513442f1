"""python analyze.py runs/NAME: leaderboard, retrain the best config on train+val, test it once;
with --baselines, retrain and test hand-made recipes on the same data and print a comparison."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

from analysis import cloud
from analysis.baselines import baseline_configs, comparison_rows, run_baseline, save_comparison
from analysis.command import command, examples
from analysis.experiment import (
    SETTINGS_FILE,
    TrialRecord,
    duration,
    export_best,
    leaderboard,
    load_trials,
    read_best_config,
    read_settings,
)
from analysis.final import retrain_and_test, retrain_split
from report import write_report
from report.comparison import comparison_text
from trainable.config import TrialConfig
from trainable.data import FinalData, prepare_final_data
from trainable.errors import UserError
from trainable.memory import limit_memory, node_in_use, trial_budget
from trainable.trial import Replay, pick_device

EPOCH_TIME = "time_this_iter_s"  # Tune's wall seconds between a trial's reports: one epoch, validation included


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples(
        ("leaderboard, retrain the best config, test it, write the report (the folder run_search.py printed)",
         command("analyze.py", "runs/NAME")),
        ("only the leaderboard and the report", command("analyze.py", "runs/NAME", "--no-retrain")),
        ("compare with two recipes at a tenth of their epochs",
         command("analyze.py", "runs/NAME", "--baselines", "resnet18_scratch,bit_hyperrule", "--epochs-scale", "0.1"))))
    p.add_argument("experiment", help="the experiment folder run_search.py wrote (STORAGE/NAME), or its cloud "
                                      "URI (s3://BUCKET/runs/NAME: fetched to a local folder, analysis/ uploaded back)")
    p.add_argument("--local-dir", default="",
                   help="with a cloud URI: the local folder to fetch it into (DIR/NAME; default: run_search.py's "
                        "local copy, ~/.cache/cifar-tune/runs/SCHEME/BUCKET/PATH/NAME)")
    p.add_argument("--config", default="",
                   help="retrain this config instead (a best_config.yaml: up to its best_epoch, as without --config)")
    p.add_argument("--data-dir", default="", help="folder holding cifar-100-python/, that folder, or "
                                                  "cifar-100-python.tar.gz (default: the search's)")
    p.add_argument("--weights-dir", default=None, help="offline pretrained weights (default: the search's)")
    p.add_argument("--full-schedule", action="store_true",
                   help="retrain the best config's whole stage plan, not only up to its best epoch")
    p.add_argument("--no-retrain", action="store_true",
                   help="don't retrain the best config (the comparison reuses an earlier retrain)")
    p.add_argument("--baselines", default="", metavar="NAME[,NAME...]",
                   help="also retrain and test these recipes (run_search.py --list-spaces) and compare")
    p.add_argument("--epochs-scale", type=float, default=1.0, metavar="F",
                   help="multiply every recipe stage's epochs (and patience) by F, e.g. 0.1 for a CPU run")
    p.add_argument("--set", action="append", default=[], metavar="[RECIPE:]KEY=VALUE",
                   help="override a recipe hyper-parameter (all recipes, or RECIPE's only); repeatable")
    return p.parse_args(argv)


def analyze(args: argparse.Namespace) -> Path:
    if cloud.is_uri(args.experiment):
        return _analyze_cloud(args)
    exp = Path(args.experiment).expanduser().resolve()
    trials = load_trials(exp) if exp.is_dir() else []
    if not exp.is_dir() or not (trials or (exp / SETTINGS_FILE).exists()):
        raise UserError(f"{exp} is not an experiment folder: pass the STORAGE/NAME folder run_search.py wrote")
    settings = read_settings(exp)
    # every input is checked before any output: a bad --config or --baselines is one line, no leaderboard above it
    given = read_best_config(Path(args.config)) if args.config else None
    best = export_best(exp, trials)  # raises a clear error when no trial finished an epoch
    out = exp / "analysis"
    selected, best_epoch = given or (best["config"], best["best_epoch"])
    cut = retrain_cut(best_epoch, selected, full_schedule=args.full_schedule)
    config = selected  # `selected` finds the trial whose epoch times predict the retrain's
    if args.weights_dir is not None:
        config = {**config, "weights_dir": str(Path(args.weights_dir).resolve()) if args.weights_dir else ""}
    names = [n.strip() for n in args.baselines.split(",") if n.strip()]
    if not names and (args.set or args.epochs_scale != 1):
        raise UserError("--set and --epochs-scale apply to --baselines recipes: add --baselines NAME[,NAME...]")
    baselines = baseline_configs(names, args.set, {"weights_dir": config["weights_dir"], "seed": config["seed"]},
                                 args.epochs_scale) if names else {}  # all checked before any training
    print(leaderboard(trials))
    print(f"\nbest: trial {best['trial_id']} val_acc {best['best_val_acc']:.4f} at epoch {best['best_epoch']}")
    if args.no_retrain and not baselines:
        return _report(exp)
    data = prepare_final_data(args.data_dir or settings.get("data_dir") or "./data", subset=settings.get("subset"),
                              seed=int(settings.get("seed", 0)), val_fraction=float(settings.get("val_fraction", 0.1)))
    if pick_device().type == "cpu":  # a memory budget as trials get: running out is an error saying what to lower
        limit_memory(trial_budget(os.cpu_count() or 1, in_use=node_in_use()))
    if not args.no_retrain:
        _retrain(trials, selected, config, data, out, cut)
    if baselines:
        _compare(args, best, config, baselines, data, out)
    return _report(exp)


def _retrain(trials: list[TrialRecord], selected: dict, config: dict, data: FinalData, out: Path,
             cut: int | None) -> None:
    cfg = TrialConfig.from_dict(config)
    if cut is not None:
        print(f"retraining up to epoch {cut} of {cfg.total_epochs}, where the best trial scored its best val_acc "
              f"(--full-schedule retrains all {cfg.total_epochs})")
    source = replay_source(trials, selected) if cfg.uses_val else None
    replay = Replay.of(source.results) if source is not None else None
    train, val = retrain_split(cfg, data, replay)
    if val is not None:
        print(f"retraining on the {len(train)} train images (its early stopping / reduce-on-plateau reads "
              f"the {len(val)} val images; no trial of this search ran the config to replay), then testing on "
              f"{len(data.test)} ...")
    else:
        print(f"retraining on {len(train)} train+val images, then testing on {len(data.test)} ...")
    if source is not None:
        print(f"  its early stopping / reduce-on-plateau read val in the search: trial {source.trial_id}'s decisions "
              f"replayed (lr cut after epoch(s) {_epochs(replay.lr_cuts)}, a stage ended early after "
              f"{_epochs(replay.early_stops)})")
    epochs = cut or cfg.total_epochs
    per_epoch = _expected_retrain(trials, selected, len(data.train_index), len(train), epochs)
    with _epoch_bar(epochs, per_epoch) as on_epoch:
        metrics = retrain_and_test(config, data, out, on_epoch=on_epoch, stop_after_epoch=cut, replay=replay)
    print(f"test_acc {metrics['test_acc']:.4f}  top5 {metrics['test_top5']:.4f}  "
          f"coarse {metrics['test_coarse_acc']:.4f}  -> {out}")


def _epochs(epochs: frozenset[int]) -> str:
    return ", ".join(map(str, sorted(epochs))) or "none"


def replay_source(trials: list[TrialRecord], selected: dict) -> TrialRecord | None:
    """The trial that ran the `selected` config, the one that ran most epochs (its plateau cuts and early stops
    are the retrain's; the retrain stops at the best epoch, which it ran); None when none did (a config given
    by hand; a screen trial ran it on a fraction of the data, so its decisions are not the retrain's)."""
    same = [t for t in trials if t.config == selected]
    return max(same, key=lambda t: t.epochs_run, default=None)


def _analyze_cloud(args: argparse.Namespace) -> Path:
    """analyze.py s3://BUCKET/runs/NAME: the experiment's files but its checkpoints (the retrain needs
    none) fetched into a local folder, analyzed there, and its analysis/ uploaded back to the URI."""
    what = "analyze.py"
    uri = cloud.check_uri(args.experiment, what=what)
    cloud.check_reachable(uri, write=False, what=what)
    exp = cloud.mirror_dir(uri, args.local_dir)
    try:
        exp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--local-dir {exp.parent} is not writable ({e.strerror}): pick another folder") from None
    fetched = cloud.download(uri, exp, ("driver", "trial"), what=what)
    if not any(exp.iterdir()):
        exp.rmdir()
        raise UserError(f"{cloud.redact(uri)} holds no experiment: pass the STORAGE/NAME URI run_search.py printed")
    print(f"experiment {cloud.redact(uri)}: fetched {len(fetched)} file(s) to {exp}")
    out = None
    try:
        out = analyze(argparse.Namespace(**{**vars(args), "experiment": str(exp)}))
    finally:  # what a failed analysis wrote is uploaded too
        files = [f for f in (exp / "analysis").rglob("*") if f.is_file()]
        try:
            if files:
                cloud.upload(files, exp, uri, what=what)
        except UserError as e:
            if out is not None:
                raise UserError(f"the analysis is in {exp / 'analysis'} but was not uploaded: {e}") from None
            print(f"warning: {e}", file=sys.stderr)  # the analysis's own error follows
    print(f"analysis: {out} and {cloud.redact(cloud.join(uri, 'analysis'))}")
    return out


def retrain_cut(best_epoch: int | None, config: dict, *, full_schedule: bool = False) -> int | None:
    """The global epoch the retrain stops after: the selected trial's best epoch when it comes before
    the config's last planned epoch (the trial was chosen there, not at its end); None = the whole plan."""
    if full_schedule or best_epoch is None or best_epoch < 1:
        return None
    return int(best_epoch) if best_epoch < TrialConfig.from_dict(config).total_epochs else None


def _compare(args: argparse.Namespace, best: dict, config: dict, baselines: dict, data: FinalData, out: Path) -> None:
    results = {}
    for name, cfg in baselines.items():
        epochs = TrialConfig.from_dict(cfg).total_epochs
        print(f"\nbaseline {name}: {cfg['backbone']}, {cfg['input_size']} px, {epochs} epochs planned", flush=True)
        with _epoch_bar(epochs) as on_epoch:
            results[name] = run_baseline(cfg, data, out / "baselines" / name, on_epoch=on_epoch)
        m = results[name]["metrics"]
        print(f"  error: {m['error']}" if "error" in m else f"  test_acc {m['test_acc']:.4f}", flush=True)
    best_metrics = out / "test_metrics.json"
    best_row = None
    if best_metrics.exists():
        best_row = {"trial_id": best["trial_id"], "config": config, "metrics": json.loads(best_metrics.read_text())}
    else:
        print("no retrain of the best config yet (analysis/test_metrics.json): the table has recipes only")
    rows = comparison_rows(best_row, results)
    save_comparison(rows, out, {"epochs_scale": args.epochs_scale, "overrides": args.set})
    print("\n" + comparison_text(rows))


def _expected_retrain(trials: list[TrialRecord], selected: dict, search_train: int, train: int,
                      epochs: int) -> list[float] | None:
    """Print the retrain's expected time, from the search trial with the `selected` config (its epoch times,
    scaled from its share of the `search_train` images to the retrain's `train`); returns the planned seconds
    per epoch (None, and a line saying so, when no trial of the experiment has that config)."""
    def hp(c: dict) -> dict:  # the same config at another fidelity (a screen trial) times it too
        return {k: v for k, v in c.items() if k != "train_fraction"}
    same = [t for t in trials if hp(t.config) == hp(selected)]
    trial = max(same, key=lambda t: float(t.config.get("train_fraction", 1.0)), default=None)
    trained = round(search_train * float(trial.config.get("train_fraction", 1.0))) if trial is not None else 0
    planned = expected_epochs(trial, epochs, train / max(1, trained)) if trial is not None else None
    if planned is None:
        print("expected time: unknown (no trial of this search ran this config); an ETA follows each epoch")
        return None
    print(f"expected time: about {duration(sum(planned))} for {epochs} epoch(s) and then the test pass "
          f"(trial {trial.trial_id}'s epochs in the search, scaled from {trained} to {train} training images)")
    return planned


def expected_epochs(trial: TrialRecord, epochs: int, scale: float) -> list[float] | None:
    """Seconds of each of the retrain's first `epochs` epochs: the trial's time for the same epoch
    times `scale` (retrain images / the trial's); an epoch the trial never ran takes its last one's
    time. None when the trial has no timed epoch."""
    times: dict[int, float] = {}
    for r in trial.results:  # a trial restarted from a checkpoint reports an epoch again: the last counts
        if isinstance(r.get("epoch"), int) and isinstance(r.get(EPOCH_TIME), (int, float)):
            times[r["epoch"]] = float(r[EPOCH_TIME])
    if not times:
        return None
    out, last = [], times[min(times)]
    for e in range(1, epochs + 1):
        last = times.get(e, last)
        out.append(last * scale)
    return out


def eta(planned: list[float] | None, total: int, done: int, elapsed: float) -> float | None:
    """Seconds left of a retrain of `total` epochs: the planned epochs left, scaled by how the done
    ones compared with their plan (this machine may be faster than trials that shared it); without
    a plan, the mean epoch so far."""
    if done <= 0:
        return sum(planned) if planned else None
    if planned and sum(planned[:done]) > 0:
        return elapsed / sum(planned[:done]) * sum(planned[done:])
    return elapsed / done * max(0, total - done)


@contextlib.contextmanager
def _epoch_bar(total: int, planned: list[float] | None = None):
    """A progress bar over the retrain's `total` epochs on a terminal; one line per epoch with the time
    left otherwise. `planned`: expected seconds per epoch (`expected_epochs`)."""
    bar = tqdm(total=total, unit="epoch", desc="train", disable=not sys.stderr.isatty())
    t0, done = time.monotonic(), 0

    def on_epoch(m: dict) -> None:
        nonlocal done
        info = {"stage": m["stage"], "loss": f"{m['train_loss']:.3f}", "img/s": f"{m['images_per_sec']:.0f}"}
        if "val_loss" in m:  # a config that trains on val_loss watches the val split
            info.update(val_loss=f"{m['val_loss']:.3f}", val_acc=f"{m['val_acc']:.3f}")
        if m.get("early_stopped"):
            info["early_stopped"] = f"stage {m['stage']}"
        bar.update(1)
        bar.set_postfix(info)
        if bar.disable:  # a terminal's bar shows its own ETA
            done += 1
            left = eta(planned, total, done, time.monotonic() - t0)
            info["eta"] = duration(left) if left is not None else "?"
            print(f"  epoch {m['epoch']}/{total} " + " ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    try:
        yield on_epoch
    finally:
        bar.close()


def _report(exp: Path) -> Path:
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
