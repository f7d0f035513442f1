"""How much each hyper-parameter mattered: Optuna's fANOVA over the saved study's trials, which hold
exactly what was sampled (a conditional parameter is absent where it did not exist) and the value the
searcher was told (best val_acc; 0.0 for a diverged or out-of-memory trial)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib.ticker import NullFormatter
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from analysis.experiment import TrialRecord
from analysis.study import TRIAL_ATTR, by_trial_id, load_study
from report.plots import COLOURS, figure, legend_below, save

# fANOVA is only as good as the random forest it fits to the trials, which needs trials that cover
# the space; Optuna's TPE does not model the space before 10 trials either (n_startup_trials)
MIN_TRIALS = 10


@dataclass
class Importance:
    evaluator: str  # "" when none could be computed
    values: dict[str, float]  # parameter -> importance, most important first
    note: str  # why there is no plot, or a caveat
    study: Any = None  # an in-memory optuna Study of the trials assessed (None when fewer than 2)


def _tagged_copy(done: list[optuna.trial.FrozenTrial], trials: list[TrialRecord]) -> optuna.Study:
    """An in-memory study of `done`, each tagged with its Tune trial's id and status for the plots."""
    records = {t.trial_id: t for t in trials}
    study = optuna.create_study(direction="maximize", study_name="report")
    for tid, t in by_trial_id(done).items():
        rec = records.get(tid)
        study.add_trial(optuna.trial.create_trial(
            params=t.params, distributions=t.distributions, value=t.value,
            user_attrs={"trial_id": tid, "status": rec.status if rec else "unknown"}))
    return study


def compute_importance(trials: list[TrialRecord], exp: Path) -> Importance:
    """Importance of each sampled hyper-parameter over the finished trials of `exp`'s saved study that
    this search ran (not those told from --warm-start DIR)."""
    saved = load_study(exp)
    done = [t for t in saved.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if TRIAL_ATTR in t.user_attrs and t.value is not None and math.isfinite(t.value)] if saved else []
    study = _tagged_copy(done, trials) if len(done) >= 2 else None
    if len(done) < MIN_TRIALS:
        return Importance("", {}, f"{len(done)} finished trial(s): importance needs at least {MIN_TRIALS} to mean "
                                  f"anything (it fits a random forest to the trials); a longer search "
                                  f"(--time-budget, --num-samples) shows it.", study)
    if not any(t.distributions for t in study.trials):
        return Importance("", {}, "no hyper-parameter varied between the trials.", study)
    if len({t.value for t in study.trials}) < 2:
        return Importance("", {}, "every trial scored the same val_acc: nothing to attribute.", study)
    values = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    if not values:
        return Importance("", {}, "no hyper-parameter was sampled in every trial.", study)
    # Optuna assesses only what every trial sampled (with one distribution): say what that leaves out
    left_out = sorted(set().union(*(t.params for t in study.trials)) - set(values))
    note = f"left out, as not sampled in every trial: {', '.join(left_out)}." if left_out else ""
    return Importance("fANOVA", {k: float(v) for k, v in values.items()}, note, study)


def plot_importance(imp: Importance, path: Path) -> Path:
    names = list(imp.values)[::-1]  # most important at the top
    fig, ax = figure(8, max(2.5, 0.45 * len(names) + 1.4))
    bars = ax.barh(names, [imp.values[n] for n in names], color=COLOURS[0], label=f"{imp.evaluator} importance")
    ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=9)
    ax.set_xlim(0, max(1.0, max(imp.values.values()) * 1.15))
    ax.set_xlabel("importance (share of val_acc variance explained; sums to 1)")
    ax.set_ylabel("hyper-parameter")
    ax.set_title(f"Hyper-parameter importance ({imp.evaluator}, {len(imp.study.trials)} trials, "
                 f"target: best val_acc)")
    legend_below(fig, ax, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


def plot_top_two(imp: Importance, path: Path) -> Path:
    """Best val_acc of each trial against the two most important parameters."""
    top = list(imp.values)[:2]
    fig, axes = figure(5.2 * len(top), 4.4, ncols=len(top), squeeze=False)
    statuses = sorted({t.user_attrs["status"] for t in imp.study.trials})
    for ax, name in zip(axes[0], top):
        dist = imp.study.trials[0].distributions[name]
        for i, status in enumerate(statuses):
            pts = [(t.params[name], t.value) for t in imp.study.trials if t.user_attrs["status"] == status]
            xs = [p[0] for p in pts]
            if isinstance(dist, CategoricalDistribution):
                xs = [dist.choices.index(x) for x in xs]
            ax.scatter(xs, [p[1] for p in pts], s=45, color=COLOURS[i % len(COLOURS)],
                       edgecolors="black", linewidths=0.5, label=status, zorder=3)
        if isinstance(dist, CategoricalDistribution):
            ax.set_xticks(range(len(dist.choices)), [str(c) for c in dist.choices])
            ax.set_xlim(-0.5, len(dist.choices) - 0.5)
        elif isinstance(dist, FloatDistribution) and dist.log:
            ax.set_xscale("log")
            ticks = np.geomspace(dist.low, dist.high, 4)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(ticks, [f"{v:.2g}" for v in ticks])
            ax.set_xlim(dist.low / 1.3, dist.high * 1.3)
        ax.set_xlabel(f"{name}{' (log scale)' if getattr(dist, 'log', False) else ''}")
        ax.set_ylabel("best val_acc of the trial")
        ax.set_title(f"val_acc vs {name} (importance {imp.values[name]:.2f})")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="trial status", loc="outside lower center", ncols=len(labels), fontsize=9)
    return save(fig, path)
