"""Optuna (TPE, seeded, define-by-run) proposes configs, starting from warm-start points; ASHA
prunes weak trials at rungs placed after every trial's head-only stage.

The Optuna study is a real SQLite database in the experiment folder (`optuna.db`, study `search`):
`optuna-dashboard sqlite:///runs/NAME/optuna.db` opens it, the report's importance reads it, and
warm-start points are enqueued in it before Ray's OptunaSearch loads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from analysis.study import METRIC, MODE, STUDY_NAME, WARM_CONFIG, StudyStorage
from spaces import Options, Space, Suggest
from trainable.config import TrialConfig

TIME_ATTR = "epoch"  # the epoch counter across all stages, reported by every trial


class DefineByRun:
    """Optuna's define-by-run function: sample the space, then return the complete resolved config
    (sampled values, --set values and TrialConfig defaults alike), so each trial's params.json can
    rerun it alone. A class, not a closure, because Tune pickles the searcher to resume it."""

    def __init__(self, space: Space, opts: Options, fixed: dict[str, Any], base: dict[str, Any]):
        self.space, self.opts, self.fixed, self.base = space, opts, fixed, base

    def __call__(self, trial: Any) -> dict[str, Any]:
        chosen = self.space.sample(Suggest(trial, self.fixed), self.opts)
        # a warm-start point fixes the sampled names through Optuna (enqueue_trial); the recipe's
        # other fields (its augment list, warm-up, patience...) come from its complete config
        point = getattr(trial, "user_attrs", {}).get(WARM_CONFIG) or {}
        return TrialConfig.from_dict({**self.base, **point, **chosen, **self.fixed}).to_dict()


def _quiet_optuna() -> None:
    """No 'study created' log line, and no warning that TPE's `group` option is experimental."""
    import warnings
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_sampler(kind: str, seed: int, n_startup_trials: int = 10) -> optuna.samplers.BaseSampler:
    """"tpe" (the default: multivariate, grouped for conditional parameters) or "random".

    TPE draws `n_startup_trials` completed trials at random before it models; warm-start
    trials count among them (they are completed trials of the study)."""
    _quiet_optuna()
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                      n_startup_trials=n_startup_trials)


def make_searcher(space: Space, opts: Options, fixed: dict[str, Any], base: dict[str, Any],
                  seed: int, exp: Path, warm: list = (), told: list = (), sampler: str = "tpe"
                  ) -> OptunaSearch:
    """Ray's OptunaSearch over the experiment's SQLite study, which first gets `told` (finished
    trials of earlier experiments, as optuna FrozenTrials) and then `warm` (spaces.warm_start
    WarmPoints, enqueued in order: the search's first trials).

    Points go in through Optuna's own enqueue_trial, not Tune's `points_to_evaluate`: with a
    define-by-run space Ray only honours names drawn through suggest_* (ray-project/ray#35319),
    and a recipe's other fields must reach the trial too (DefineByRun reads them back).
    """
    # with a warm start, TPE models once as many trials as there are expert points have reported
    # (a designed start-up set, better than random draws: PriorBand); without one, Optuna's default
    # 10. Optuna counts only finished trials, so proposals asked for while expert points still run
    # (concurrent trials) are random draws (benchmarks/duel.py saw it)
    n_startup = min(10, len(warm) + len(told)) if (warm or told) else 10
    smp = make_sampler(sampler, seed, max(1, n_startup))
    Path(exp).mkdir(parents=True, exist_ok=True)
    storage = StudyStorage(exp)  # WAL, a long busy timeout, retried writes, follows a moved folder
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize",
                                sampler=smp, load_if_exists=True)
    if not study.trials:  # a new experiment (a resumed one restores its searcher instead)
        study.add_trials(list(told))
        for p in warm:
            study.enqueue_trial(p.params, user_attrs={"warm_start": p.name, WARM_CONFIG: p.config})
    # Optuna is told each trial's best epoch, not its last, so a trial ASHA pruned keeps its score
    return OptunaSearch(space=DefineByRun(space, opts, fixed, base), metric="best_val_acc", mode=MODE,
                        sampler=smp, storage=storage, study_name=STUDY_NAME)


def stage_aware_grace(space: Space, max_epochs: int) -> int:
    """ASHA's first rung: one epoch after the space's longest head-only stage 1, so every trial
    that unfreezes blocks has trained them for an epoch before it can be pruned (a decision at
    epoch 1 would judge only stage-1 parameters: head lr, input size, backbone)."""
    return min(space.longest_stage1(max_epochs) + 1, max_epochs)


def make_scheduler(kind: str, max_t: int, grace_period: int, reduction_factor: int
                   ) -> ASHAScheduler | FIFOScheduler:
    if kind == "fifo":  # every trial runs its whole schedule: the baseline ASHA is measured against
        return FIFOScheduler()
    return ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode=MODE, max_t=max_t,
                         grace_period=min(grace_period, max_t), reduction_factor=reduction_factor)


def told_trials(dirs: list[Path], space: Space, opts: Options, fixed: dict[str, Any]) -> tuple[list, list[str]]:
    """The finished trials of earlier experiments as Optuna FrozenTrials of this space (value: the
    trial's best val_acc; 0 for one that diverged or ran out of memory, as in a search), and one
    line per trial that is not a point of this space."""
    from analysis.experiment import load_trials
    from spaces.warm_start import OutsideSpace, as_point, fit_epochs
    frozen, skipped = [], []
    for d in dirs:
        for t in load_trials(d):
            if not t.results:
                continue
            value = float(t.best[METRIC]) if t.best is not None else 0.0
            try:
                # an experiment with another epoch budget: its plan scaled to this one's
                cfg = fit_epochs(t.config, opts.max_epochs)
                p = as_point(f"{d.name}/{t.trial_id}", cfg, space, opts, fixed)
            except (OutsideSpace, ValueError) as e:
                skipped.append(f"{d.name}/{t.trial_id}: {e}")
                continue
            frozen.append(optuna.trial.create_trial(
                params=p.params, distributions=p.distributions, value=value,
                user_attrs={"warm_start": p.name, "status": t.status}))
    return frozen, skipped
