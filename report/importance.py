"""How much each hyper-parameter mattered: Optuna's importance evaluator over the search's trials.

The search saves its Optuna study in the experiment folder (optuna.db, SQLite, study "search");
its trials hold exactly what was sampled, so a conditional parameter (plateau_patience, asked only
when schedule=constant) is absent where it did not exist, and Optuna's importance leaves it out
instead of reading its default as a value. Each trial's value is what the searcher was told (its
best val_acc; 0.0 for a diverged or out-of-memory trial).

Experiments from before the study was saved have no optuna.db: their trials are rebuilt from
params.json (strings and booleans categorical, ints an int range, floats a float range, log-scaled
for learning rates and weight decay or any positive range spanning a factor of 100; parameters that
never varied left out), and the report says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import NullFormatter

from analysis.experiment import TrialRecord
from analysis.study import METRIC, STUDY_FILE, STUDY_NAME, WARM_CONFIG, study_url
from report.plots import COLOURS, figure, legend_below, save
from spaces import space_view
from trainable.config import RUN_FIELDS

LOG_HINTS = ("_lr", "lr", "weight_decay")  # searched on a log scale whenever they vary
# Below this many finished trials the report shows a sentence, not importances or scatter plots:
# fANOVA's answer is only as good as the random forest it fits to the trials, which needs trials
# that cover the space (Optuna's FanovaImportanceEvaluator docs), and Optuna's own TPE does not
# model the space before 10 trials either (n_startup_trials=10); W&B's parameter-importance panel
# likewise fits a random forest to the runs. With 2-9 trials the bars were noise drawn precisely.
MIN_TRIALS = 10
IGNORED = RUN_FIELDS | {"pretrained"}  # pretrained: fixed for a whole search (--no-pretrained)


@dataclass
class Importance:
    evaluator: str  # "" when none could be computed
    values: dict[str, float]  # parameter -> importance, most important first
    note: str  # why there is no plot, or a caveat
    study: Any = None  # the optuna Study (None when fewer than 2 trials)


def scored(trials: list[TrialRecord]) -> list[tuple[TrialRecord, float]]:
    """(trial, value) for every trial that finished an epoch: best val_acc; 0.0 when it diverged
    or ran out of memory (as the searcher was told)."""
    out = []
    for t in trials:
        if t.failure is not None:
            out.append((t, 0.0))
        elif t.best is not None:
            out.append((t, float(t.best[METRIC])))
    return out


def infer_distributions(configs: list[dict[str, Any]]):
    """{name: optuna distribution} for the parameters that take more than one value."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )
    dists = {}
    for name in sorted(set().union(*configs) - IGNORED) if configs else []:
        vals = [c[name] for c in configs if name in c]
        if len(vals) < len(configs) or len({repr(v) for v in vals}) < 2:
            continue
        if all(isinstance(v, bool) for v in vals) or all(isinstance(v, str) for v in vals):
            dists[name] = CategoricalDistribution(sorted(set(vals), key=repr))
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            dists[name] = IntDistribution(min(vals), max(vals))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals):
            lo, hi = float(min(vals)), float(max(vals))
            log = lo > 0 and (hi / lo >= 100 or name.endswith(LOG_HINTS))
            dists[name] = FloatDistribution(lo, hi, log=log)
        else:  # mixed or unhashable: compare as text
            dists[name] = CategoricalDistribution(sorted({repr(v) for v in vals}))
    return dists


def _value(v: Any, dist) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    if isinstance(dist, CategoricalDistribution) and v not in dist.choices:
        return repr(v)
    return float(v) if isinstance(dist, FloatDistribution) else v


def build_study(trials: list[TrialRecord]):
    """An in-memory Optuna study holding the scored trials, or None with fewer than 2."""
    import optuna
    pairs = scored(trials)
    if len(pairs) < 2:
        return None
    dists = infer_distributions([t.config for t, _ in pairs])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="report")
    for t, value in pairs:
        params = {k: _value(t.config[k], d) for k, d in dists.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value,
                                                  user_attrs={"trial_id": t.trial_id, "status": t.status}))
    return study


def load_saved_study(exp: Path):
    """The search's own Optuna study from `exp`/optuna.db, or None when the experiment has none."""
    import optuna
    db = Path(exp) / STUDY_FILE
    if not db.is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=STUDY_NAME, storage=study_url(exp))


def saved_trials_study(saved, trials: list[TrialRecord]):
    """An in-memory copy of the saved study's finished trials (params exactly as sampled), each
    tagged with its Tune trial's status for the plots; None with fewer than 2. Trials of earlier
    experiments the searcher was told (--warm-start DIR) are not this search's and stay out."""
    import optuna
    done = [t for t in search_trials(saved) if t.value is not None and math.isfinite(t.value)]
    if len(done) < 2:
        return None
    unmatched = list(trials)
    study = optuna.create_study(direction="maximize", study_name="report")
    for t in done:
        # Tune's trial ids are not in the study: the trial whose config holds these values is it
        rec = next((r for r in unmatched if all(_same(space_view(r.config).get(k), v) for k, v in t.params.items())), None)
        if rec is not None:
            unmatched.remove(rec)
        study.add_trial(optuna.trial.create_trial(
            params=t.params, distributions=t.distributions, value=t.value,
            user_attrs={"trial_id": rec.trial_id if rec else "", "status": rec.status if rec else "unknown"}))
    return study


def search_trials(saved) -> list:
    """The saved study's completed trials that this search ran (told ones carry a warm_start
    attribute without the config an enqueued recipe point carries)."""
    from optuna.trial import TrialState
    return [t for t in saved.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "warm_start" not in t.user_attrs or WARM_CONFIG in t.user_attrs]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def compute_importance(trials: list[TrialRecord], exp: Path | None = None) -> Importance:
    """Importance of each sampled hyper-parameter for the trials of experiment `exp` (default:
    the folder holding the trials), from its saved Optuna study, else from params.json."""
    import optuna
    exp = Path(exp) if exp is not None else (trials[0].path.parent if trials else None)
    saved = load_saved_study(exp) if exp is not None else None
    if saved is not None:
        study = saved_trials_study(saved, trials)
        finished = len(search_trials(saved))
        caveat = ""
    else:
        study = build_study(trials)
        finished = len(scored(trials))
        caveat = (f"this experiment has no {STUDY_FILE} (it predates the saved study), so the trials are "
                  f"rebuilt from params.json, where a conditional parameter's default counts as a value.")
    if study is None or len(study.trials) < MIN_TRIALS:
        n = finished if study is None else len(study.trials)
        return Importance("", {}, f"{n} finished trial(s): importance needs at least {MIN_TRIALS} to mean "
                                  f"anything (it fits a random forest to the trials); a longer search "
                                  f"(--time-budget, --num-samples) shows it.", study)
    if not any(t.distributions for t in study.trials):
        return Importance("", {}, "no hyper-parameter varied between the trials.", study)
    if len({t.value for t in study.trials}) < 2:
        return Importance("", {}, "every trial scored the same val_acc: nothing to attribute.", study)
    try:
        evaluator, name = optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except ImportError:  # fANOVA needs scikit-learn; PED-ANOVA needs nothing extra
        evaluator, name = optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    if not values:
        return Importance("", {}, "no hyper-parameter was sampled in every trial.", study)
    # Optuna assesses only what every trial sampled (with one distribution): say what that leaves out
    left_out = sorted(set().union(*(t.params for t in study.trials)) - set(values))
    notes = [caveat] if caveat else []
    if left_out:
        notes.append(f"left out, as not sampled in every trial: {', '.join(left_out)}.")
    return Importance(name, {k: float(v) for k, v in values.items()}, " ".join(notes), study)


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
    from optuna.distributions import CategoricalDistribution, FloatDistribution
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
