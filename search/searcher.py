"""Optuna proposes configs (define-by-run, seeded: moves around the incumbent mixed with TPE,
search/incumbent.py), starting from warm-start points that a low-fidelity screen ranks first;
ASHA prunes weak trials at rungs placed after every trial's head-only stage.

The Optuna study is a real SQLite database in the experiment folder (`optuna.db`, study `search`):
`optuna-dashboard sqlite:///runs/NAME/optuna.db` opens it, the report's importance reads it, and
warm-start points are enqueued in it before Ray's OptunaSearch loads it.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from analysis.outcome import planned_epochs
from analysis.study import EXTRA_ATTR, FIDELITY_ATTR, METRIC, MODE, STUDY_NAME, WARM_CONFIG, StudyStorage
from search.incumbent import IncumbentSampler, screened
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
        # other fields (its augment list, warm-up, patience...) come from its complete config, and
        # a local move of it keeps them (search/incumbent.py)
        attrs = getattr(trial, "user_attrs", {})
        point = attrs.get(WARM_CONFIG) or attrs.get(EXTRA_ATTR) or {}
        return TrialConfig.from_dict({**self.base, **point, **chosen, **self.fixed}).to_dict()


def _quiet_optuna() -> None:
    """No 'study created' log line, and no warning that TPE's `group` option is experimental."""
    import warnings
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_sampler(kind: str, seed: int, n_startup_trials: int = 10) -> optuna.samplers.BaseSampler:
    """"incumbent" (the default: moves around the best config mixed with TPE, search/incumbent.py),
    "tpe" (multivariate, grouped for conditional parameters) or "random".

    TPE draws `n_startup_trials` finished trials at random before it models; warm-start
    trials count among them."""
    _quiet_optuna()
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant liar: a running trial counts as bad, so two proposals asked for at once differ
    tpe = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                     n_startup_trials=n_startup_trials, warn_independent_sampling=False)
    return IncumbentSampler(tpe, seed=seed) if kind == "incumbent" else tpe


FIELDS = frozenset(f.name for f in dataclasses.fields(TrialConfig))


class FidelitySearch(OptunaSearch):
    """Ray's OptunaSearch, telling Optuna each trial at its fidelity, and promoting the screen.

    Ray tells a trial that ASHA stopped (or the time budget cut) as COMPLETE with its value at the
    rung (ray/tune/search/optuna/optuna_search.py, on_trial_complete, Ray 2.60), so 1-epoch and
    full-budget values are ranked together. Here a trial that ended before its plan did, or that
    trained on a fraction of the data (the screen), is told PRUNED: its per-epoch values stay
    as intermediate values, and TPE ranks pruned trials below complete ones (optuna#4211).

    When the last screen trial has ended, the best `promote` of them are enqueued again at full
    fidelity (successive halving among the recipe points: the screen is its first rung).
    """

    def __init__(self, *args, promote: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.promote = promote

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        # Ray adds every sampled name to the config; a space's structural choice ("stages") is no field
        config = super().suggest(trial_id)
        return {k: v for k, v in config.items() if k in FIELDS} if isinstance(config, dict) else config

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        requeue_lost(self._ot_study, {t.number for t in self._ot_trials.values()})

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if (result and not error and trial_id in self._ot_trials and trial_id not in self._completed_trials
                and low_fidelity(result)):
            ot_trial = self._ot_trials[trial_id]
            # a trial's last result reaches the searcher here only (Tune passes a finished trial's
            # final result to on_trial_complete, not on_trial_result): report it, since PRUNED
            # keeps the last intermediate value as the trial's value
            if self.metric in result and "training_iteration" in result:
                with warnings.catch_warnings():  # a step already reported is kept (Optuna warns)
                    warnings.simplefilter("ignore")
                    ot_trial.report(result[self.metric], result["training_iteration"])
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
        else:
            super().on_trial_complete(trial_id, result, error)
        if self.promote:  # also after a screen trial that failed: the screen may have ended with it
            promote_screen(self._ot_study, self.promote)


def low_fidelity(result: dict[str, Any]) -> bool:
    """A trial's last result (flattened, as Tune passes it) was reached below full fidelity: on a
    fraction of the data, or before its plan's last epoch without early-stopping itself."""
    config = {k.removeprefix("config/"): v for k, v in result.items() if k.startswith("config/")}
    if result.get("status", "ok") != "ok":
        return False  # a failure is told as a 0, everywhere, so the searcher avoids its region
    planned = planned_epochs(config) if config and "epoch" in result else None  # None: nothing to compare
    cut = planned is not None and int(result["epoch"]) < planned and not result.get("early_stopped")
    return cut or float(config.get("train_fraction", 1.0)) < 1.0


def requeue_lost(study: optuna.Study, known: set[int]) -> list[int]:
    """After a restore: trials the study holds as RUNNING that the restored searcher never knew (a
    driver killed between asking for a trial and saving its state) are told FAIL, and a planned
    point among them (a recipe point, a screen or a promotion) is enqueued again, so the plan
    neither loses it nor waits for it forever. Returns the numbers told FAIL."""
    lost = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.number not in known]
    for t in lost:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if WARM_CONFIG in t.user_attrs:
            study.enqueue_trial(t.params, user_attrs=t.user_attrs)
    return [t.number for t in lost]


def promote_screen(study: optuna.Study, k: int) -> list[int]:
    """Once no screen trial waits or runs, enqueue the best `k` screen trials at full fidelity
    (once per study); returns their numbers."""
    trials = study.get_trials(deepcopy=False)
    screen = [t for t in trials if t.user_attrs.get(FIDELITY_ATTR, 1.0) < 1.0]
    if not screen or any(t.user_attrs.get("promoted_from") is not None for t in trials):
        return []
    if any(t.state in (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING) for t in screen):
        return []
    best = screened(trials)[:k]
    for t in best:
        config = {**t.user_attrs.get(WARM_CONFIG, {}), "train_fraction": 1.0}
        study.enqueue_trial(t.params, user_attrs={"warm_start": t.user_attrs.get("warm_start", f"trial {t.number}"),
                                                  WARM_CONFIG: config, "promoted_from": t.number})
    return [t.number for t in best]


def make_searcher(space: Space, opts: Options, fixed: dict[str, Any], base: dict[str, Any],
                  seed: int, exp: Path, warm: list = (), told: list = (), sampler: str = "incumbent",
                  screen_fraction: float = 1.0, promote: int = 0) -> OptunaSearch:
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
        for p in warm:  # screened at `screen_fraction` of the data (< 1), or run at full fidelity
            screen = {FIDELITY_ATTR: screen_fraction} if screen_fraction < 1 else {}
            study.enqueue_trial(p.params, user_attrs={"warm_start": p.name, **screen,
                                                      WARM_CONFIG: {**p.config, "train_fraction": screen_fraction}})
    # Optuna is told each trial's best epoch, not its last, so a trial ASHA pruned keeps its score
    return FidelitySearch(space=DefineByRun(space, opts, fixed, base), metric="best_val_acc", mode=MODE,
                          sampler=smp, storage=storage, study_name=STUDY_NAME,
                          promote=promote if screen_fraction < 1 else 0)


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
