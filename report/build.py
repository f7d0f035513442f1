"""write_report(EXP): EXP/analysis/report.html (one self-contained file) and the PNGs it embeds."""
from __future__ import annotations

import datetime
import json
from collections import Counter
from pathlib import Path

import yaml

from analysis.experiment import (
    PARAM_COLUMNS,
    PARAM_HEADS,
    TrialRecord,
    load_trials,
    load_yaml,
    param_cells,
    rank,
    read_settings,
)
from analysis.study import METRIC
from report import comparison, versus
from report import html as h
from report.classes import (
    load_class_results,
    plot_classes,
    plot_confusions,
    ranked_classes,
    top_confusions,
)
from report.curves import plot_curves
from report.importance import compute_importance, plot_importance, plot_top_two
from report.schedule import plot_schedule
from trainable import atomic

REPORT = "report.html"
HEAD = ["#", "trial", "best val_acc", "@epoch", "epochs run/planned", "status"] + PARAM_HEADS
NUMERIC = {0, 2, 3} | {6 + i for i, k in enumerate(PARAM_COLUMNS) if k not in ("backbone", "aug_strength")}  # aug: may be a list


def write_report(exp_dir: Path) -> Path:
    exp = Path(exp_dir).resolve()
    out = exp / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    trials = load_trials(exp)
    settings = read_settings(exp)
    data_dir = str(settings.get("data_dir") or "")
    data = Path(data_dir).name or data_dir or "the search's data"  # what the accuracies were measured on
    ranked = rank(trials)
    sections = [_summary(trials, ranked, out, data), versus.section(exp, trials, out),
                _curves(trials, out, data), _importance(trials, exp, out), _leaderboard(trials, data),
                _schedule(ranked, out), _test(out, data), comparison.section(out, data), _best_config(exp)]
    subset = settings.get("subset")
    subtitle = (f"{exp} · space {settings.get('space', '?')} · {len(trials)} trials · data {data}"
                + (f" ({subset} images per class)" if subset else "")
                + f" · written {datetime.datetime.now():%Y-%m-%d %H:%M}")
    path = out / REPORT
    atomic.write_text(path, h.page(f"Search report: {exp.name}", subtitle, sections))
    return path


def _summary(trials, ranked, out: Path, data: str) -> str:
    counts = Counter(t.status for t in trials)
    items = [("trials", str(len(trials)))] + [(status, str(n)) for status, n in sorted(counts.items())]
    if ranked:
        items.append(("best val_acc", h.pct(ranked[0].best[METRIC])))
    metrics = _test_metrics(out)
    if metrics:
        items.append((f"test accuracy on {data}", h.pct(metrics["test_acc"])))
    return h.section("Summary", h.cards(items),
                     h.note(f"val_acc is measured on the validation split held out from {data}'s "
                            f"training file; test accuracy on its test file, once, after retraining."))


def _curves(trials, out: Path, data: str) -> str:
    if not any(t.results for t in trials):
        return h.section("Validation accuracy per epoch", h.note("no trial reported an epoch yet."))
    png = plot_curves(trials, out / "val_acc_curves.png")
    return h.section("Validation accuracy per epoch", h.img(png, "val_acc per epoch for every trial"),
                     h.note("Marker shape = the stage of that epoch; dash-dotted lines = where the best "
                            "trial's stages begin. A dashed line ending in a big X is a trial ASHA "
                            "pruned."))


def _importance(trials, exp: Path, out: Path) -> str:
    imp = compute_importance(trials, exp)
    title = "Which hyper-parameters mattered"
    if not imp.values:
        return h.section(title, h.note(f"No importance plot: {imp.note}"))
    parts = [h.img(plot_importance(imp, out / "param_importance.png"), "hyper-parameter importance")]
    parts.append(h.img(plot_top_two(imp, out / "val_acc_vs_top_params.png"),
                       "best val_acc against the two most important parameters"))
    parts.append(h.note(f"Optuna's {imp.evaluator} evaluator over {len(imp.study.trials)} trials "
                        f"(target: each trial's best val_acc; diverged or out-of-memory trials count as 0)."
                        + (f" Caveat: {imp.note}" if imp.note else "")))
    return h.section(title, *parts)


def leaderboard_rows(trials: list[TrialRecord]) -> list[list[str]]:
    """Every trial, ranked ones first, with the parameters that matter."""
    ranked = rank(trials)
    rows = []
    for t in ranked + [t for t in trials if t not in ranked]:
        if t in ranked:
            head = [str(len(rows) + 1), t.trial_id, h.pct(t.best[METRIC]), str(t.best["epoch"])]
        else:
            head = ["–", t.trial_id, "–", "–"]
        status = t.status + (f": {t.reason}" if t.reason else "")
        rows.append(head + [f"{t.epochs_run}/{t.planned_epochs}", status] + param_cells(t.config))
    return rows


def _leaderboard(trials, data: str) -> str:
    rows = leaderboard_rows(trials)
    return h.section("Leaderboard", h.table(HEAD, rows, numeric=NUMERIC, highlight={0} if rank(trials) else set()),
                     h.note(f"best val_acc on {data}'s validation split, at the epoch shown; "
                            "'pruned' = ASHA stopped the trial at a rung; "
                            "'early-stopped' = its own val_loss patience ran out; "
                            "'interrupted' / 'out of time budget' = the search ended while it ran."))


def _schedule(ranked, out: Path) -> str:
    title = "Learning-rate schedule of the best trial"
    if not ranked:
        return h.section(title, h.note("no trial finished an epoch."))
    png = plot_schedule(ranked[0], out / "lr_schedule.png")
    return h.section(title, h.img(png, "learning-rate schedule of the best trial"),
                     h.note("Recomputed per optimiser step with the training code's own stage plan "
                            "and scheduler; diamonds are the lr the trial reported after each epoch "
                            "(reduce-on-plateau cuts and early-stopped stages show only there)."))


def _test_metrics(out: Path) -> dict | None:
    p = out / "test_metrics.json"
    return json.loads(p.read_text()) if p.exists() else None


def _test(out: Path, data: str) -> str:
    title = "Retrained best config: test results"
    metrics, res = _test_metrics(out), load_class_results(out)
    if metrics is None or res is None:
        return h.section(title, h.note("No retrain yet: run analyze.py without --no-retrain to "
                                       "retrain the best config and test it."))
    parts = [h.cards([(f"test accuracy on {data}", h.pct(metrics["test_acc"])),
                      ("coarse (superclass) accuracy", h.pct(metrics["test_coarse_acc"])),
                      ("top-5 accuracy", h.pct(metrics["test_top5"])),
                      ("test loss", f"{metrics['test_loss']:.3f}")]),
             h.note(f"{metrics.get('test_images', '?')} test images; retrained for {metrics.get('epochs', '?')} "
                    f"epochs on {metrics.get('train_images', '?')} "
                    f"{_trained_on(metrics)} in "
                    f"{metrics.get('train_seconds', 0):.0f} s. Coarse accuracy: a fine prediction "
                    "counts when it falls in the right superclass.")]
    if metrics.get("cut_at_epoch"):
        parts.append(h.note(cut_sentence(metrics)))
    parts.append(h.img(plot_classes(res, out / "class_accuracy.png"), "best and worst classes"))
    best, worst = ranked_classes(res)
    rows = [[n + 1, res.names[b], h.pct(res.accuracy[b]), res.names[w], h.pct(res.accuracy[w])]
            for n, (b, w) in enumerate(zip(best, worst))]
    parts.append(h.table(["#", "best class", "accuracy", "worst class", "accuracy"], rows, numeric={0, 2, 4}))
    conf_png = plot_confusions(res, out / "confusions.png")
    if conf_png is not None:
        parts.append(h.img(conf_png, "confusion pairs that cost most"))
        parts.append(h.table(["true class", "predicted as", "test images", "share of the true class"],
                             [[res.names[t], res.names[p], c, h.pct(c / max(1, res.support[t]))]
                              for t, p, c in top_confusions(res)], numeric={2, 3}))
    return h.section(title, *parts)


def cut_sentence(metrics: dict) -> str:
    """Why the retrain ran fewer epochs than the config plans, in one sentence."""
    n, m = metrics["cut_at_epoch"], metrics.get("planned_epochs", "?")
    return (f"The retrain was cut at epoch {n} of {m} because the search selected the best trial by its "
            f"val_acc at epoch {n} (later epochs scored lower or never ran): it follows that trial's stage "
            f"plan and learning-rate schedule, built for all {m} epochs, and stops there "
            f"(analyze.py --full-schedule trains all {m}).")


def _best_config(exp: Path) -> str:
    title = "Best config and how to reproduce it"
    p = exp / "best_config.yaml"
    if not p.exists():
        return h.section(title, h.note("no best_config.yaml: run analyze.py on the experiment first."))
    best = load_yaml(p, "the exported best config", "run analyze.py on the experiment again to rewrite it")
    return h.section(title, h.note(f"Trial {best['trial_id']}, best val_acc {h.pct(best['best_val_acc'])} at "
                                   f"epoch {best['best_epoch']}. Retrain and test it with:"),
                     h.pre(best["retrain_command"]), h.note(f"{p}:"),
                     h.pre(yaml.safe_dump({"config": best["config"]}, sort_keys=True)))


def _trained_on(metrics: dict) -> str:
    """The retrain's images, and how its val-reading early stopping / plateau was handled."""
    if metrics.get("watched_val"):
        return "train images (val watched for early stopping / plateau)"
    r = metrics.get("replayed")
    if r:
        return (f"train+val images (the search trial's early stopping / plateau decisions replayed: lr cut after "
                f"epoch(s) {', '.join(map(str, r['lr_cuts'])) or 'none'}, a stage ended early after "
                f"{', '.join(map(str, r['early_stops'])) or 'none'})")
    return "train+val images"
