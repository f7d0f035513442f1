"""Optuna proposes configs (define-by-run; moves around the incumbent mixed with TPE, planning/incumbent.py), the
warm-start points first; ASHA prunes weak trials at rungs placed after every trial's head-only stage. The study
is `optuna.db` in the experiment folder, where the points are enqueued before Ray's OptunaSearch loads it."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from analysis.outcome import low_fidelity, on_a_fraction
from analysis.study import (CAL_LOSS_ATTR, FIDELITY_ATTR, LOSS_ATTR, METRIC, MODE, STUDY_NAME, TRIAL_ATTR, WARM_CONFIG, StudyStorage,
                            by_trial_id)
from planning.define import DefineByRun, quiet_optuna
from planning.incumbent import IncumbentSampler, screen_trial, screened
from search import ray_adapter
from spaces import Options, Space
from trainable.config import TrialConfig

TIME_ATTR = "epoch"  # the epoch counter across all stages, reported by every trial
FIELDS = frozenset(f.name for f in dataclasses.fields(TrialConfig))


def make_sampler(kind: str, seed: int, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    """"incumbent", "tpe" (multivariate, grouped for conditional parameters) or "random"."""
    quiet_optuna()
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant liar: a running trial counts as bad, so two proposals asked for at once differ
    tpe = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                     n_startup_trials=n_startup_trials)
    return IncumbentSampler(tpe, seed=seed) if kind == "incumbent" else tpe


class FidelitySearch(OptunaSearch):
    """Ray's OptunaSearch, which tells a trial ASHA stopped COMPLETE with its rung value; here a trial cut before
    its plan's end or screened on a fraction of the data is told PRUNED (TPE ranks those below complete ones).
    When the screen has ended, its best `promote` are enqueued at full fidelity; until then no proposal of its own
    starts (`screen_running`)."""

    def __init__(self, *args, promote: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.promote = promote

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.promote and screen_running(ray_adapter.optuna_state(self)[0]):
            return None  # Tune asks again later: the free worker waits for the promotions
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config
        # the key by which the report and the search's end find the trial's Optuna trial
        ray_adapter.optuna_state(self)[1][trial_id].set_user_attr(TRIAL_ATTR, trial_id)
        # Ray adds every sampled name to the config; a space's structural choice ("stages") is no field
        return {k: v for k, v in config.items() if k in FIELDS}

    def follow(self, live: set[str], ended: dict[str, dict[str, Any]]) -> int:
        """After a restore, make the searcher's trials the Tune trials the resume restored: `live` (ids to run
        or run again) and `ended` ({id: last flattened result}). Tune writes its trials, then the searcher, and
        uploads them file by file while the study is written as trials go, so a kill can leave any of the three
        ahead: a Tune trial is followed (told when it ends, or now if it has; its rerun ignored if the study
        has its value), an unfinished Optuna trial Tune lost is lost (`requeue_lost`). Returns how many trials
        the search has started: Tune's and any whose value the study has but Tune lost."""
        study, ot_trials, told = ray_adapter.optuna_state(self)
        restored = live | ended.keys()
        by_tune = by_trial_id(study.get_trials(deepcopy=False))
        for trial_id in ot_trials.keys() - restored:
            del ot_trials[trial_id]
        for trial_id in restored & by_tune.keys():
            t = by_tune[trial_id]
            if t.state.is_finished():
                told.add(trial_id)  # its value stands; Tune's rerun of it is ignored
            elif trial_id not in ot_trials:
                ot_trials[trial_id] = reopen(study, t)
        requeue_lost(study, {t.number for t in ot_trials.values()})
        for trial_id, result in ended.items():
            if trial_id in ot_trials and trial_id not in told:
                self.on_trial_complete(trial_id, result)
        valued = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(restored) + sum(1 for k, t in by_tune.items() if k not in restored and t.state in valued)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        study, ot_trials, told = ray_adapter.optuna_state(self)
        to_tell = bool(result) and not error and trial_id in ot_trials and trial_id not in told
        for key, attr in (("val_loss", LOSS_ATTR), ("val_cal_loss", CAL_LOSS_ATTR)):
            if to_tell and key in result:
                ot_trials[trial_id].set_user_attr(attr, float(result[key]))
        if to_tell and low_fidelity(result):
            ot_trial = ot_trials[trial_id]
            # Tune passes a trial's last result here only; PRUNED keeps the last reported value
            if self.metric in result and "training_iteration" in result:
                with warnings.catch_warnings():  # a step already reported is kept (Optuna warns)
                    warnings.simplefilter("ignore")
                    ot_trial.report(result[self.metric], result["training_iteration"])
            study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
            told.add(trial_id)
        else:
            super().on_trial_complete(trial_id, result, error)
        if self.promote:  # also after a screen trial that failed: the screen may have ended with it
            promote_screen(study, self.promote)


def screen_running(study: optuna.Study) -> bool:
    """Every planned point has started and a screen trial still runs. A proposal made now has only screen
    values to go on (moves of a noisy screen best); started now, it delays the promoted recipes, whose
    moves the budget then cut (a duel run of BENCHMARKS.md, 2026-12-06). Waiting costs the screen's last trial's tail."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == optuna.trial.TrialState.WAITING for t in trials):
        return False
    return any(t.state == optuna.trial.TrialState.RUNNING and screen_trial(t) for t in trials)


def reopen(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> optuna.trial.Trial:
    """Optuna's Trial for a running trial, built as `optuna.trial.Trial.__init__` builds it but without the
    sampler's `before_trial`, which would plan a new local move onto a trial that already ran with its own.
    (Optuna has no public way to reopen a trial.)"""
    trial = optuna.trial.Trial.__new__(optuna.trial.Trial)
    trial.study, trial._trial_id, trial.storage = study, frozen._trial_id, study._storage
    trial._cached_frozen_trial = frozen
    trial.relative_search_space, trial._relative_params = None, None
    trial._fixed_params = frozen.system_attrs.get("fixed_params", {})
    return trial


def requeue_lost(study: optuna.Study, known: set[int]) -> list[int]:
    """After a restore: RUNNING trials the restored searcher never knew (the driver killed between
    asking and saving) are told FAIL, a planned point among them enqueued again; returns their numbers.
    A point is enqueued with the params it was planned with: a kill between Optuna's ask and the
    define-by-run leaves the trial RUNNING with none written yet."""
    lost = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.number not in known]
    for t in lost:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if WARM_CONFIG in t.user_attrs:  # to be asked for by a new Tune trial
            study.enqueue_trial(t.system_attrs.get("fixed_params", t.params),
                                user_attrs={k: v for k, v in t.user_attrs.items() if k != TRIAL_ATTR})
    return [t.number for t in lost]


def promote_screen(study: optuna.Study, k: int) -> list[int]:
    """Once no screen trial waits or runs, enqueue the best `k` screen trials at full fidelity
    (once per study); returns their numbers."""
    trials = study.get_trials(deepcopy=False)
    screen = [t for t in trials if screen_trial(t)]
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


def make_searcher(space: Space, opts: Options, fixed: dict[str, Any], base: dict[str, Any], seed: int, exp: Path,
                  warm: list = (), told: list = (), sampler: str = "incumbent",
                  screen_fraction: float | list[float] = 1.0, promote: int = 0) -> OptunaSearch:
    """Ray's OptunaSearch over the experiment's study, which first gets `told` (earlier experiments' trials),
    then `warm` (WarmPoints, enqueued: Tune's `points_to_evaluate` keeps only names drawn by suggest_* in a
    define-by-run space, ray#35319), each at `screen_fraction` of the training data (one for all, or one each:
    planning.plan.BudgetPlan.fractions); the best `promote` of those below 1 then run whole."""
    fractions = [screen_fraction] * len(warm) if isinstance(screen_fraction, (int, float)) else list(screen_fraction)
    # with a warm start TPE models once the expert points have reported (PriorBand), else after Optuna's 10
    smp = make_sampler(sampler, seed, min(10, len(warm) + len(told)) or 10)
    Path(exp).mkdir(parents=True, exist_ok=True)
    storage = StudyStorage(exp)  # WAL, a long busy timeout, retried writes, follows a moved folder
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize",
                                sampler=smp, load_if_exists=True)
    if not study.trials:  # a new experiment (a resumed one restores its searcher instead)
        study.add_trials(list(told))
        for p, fraction in zip(warm, fractions, strict=True):  # screened (< 1), or run at full fidelity
            screen = {FIDELITY_ATTR: fraction} if fraction < 1 else {}
            study.enqueue_trial(p.params, user_attrs={"warm_start": p.name, **screen,
                                                      WARM_CONFIG: {**p.config, "train_fraction": fraction}})
    # Optuna is told each trial's best epoch, not its last, so a trial ASHA pruned keeps its score
    return FidelitySearch(space=DefineByRun(space, opts, fixed, base), metric="best_val_acc", mode=MODE,
                          sampler=smp, storage=storage, study_name=STUDY_NAME,
                          promote=promote if any(f < 1 for f in fractions) else 0)


def stage_aware_grace(space: Space, max_epochs: int) -> int:
    """ASHA's first rung: one epoch after the space's longest head-only stage 1, so no trial is judged
    before its unfrozen blocks have trained."""
    return min(space.longest_stage1(max_epochs) + 1, max_epochs)


class FullFidelityASHA(ASHAScheduler):
    """Ray's ASHA, blind to screen trials (a fraction of the data): it neither prunes them nor records their values
    in the rungs full-fidelity trials are judged by. A screen trial runs its whole plan and the screen ranks it by
    its calibrated loss at its end (planning/incumbent.screened); Ray 2.60's ASHA (async_hyperband.py, one bracket) judged them
    by val_acc at its first rung: over ten setting-2 duel runs (BENCHMARKS.md, 2026-12-07) it cut 3-5 of the 7 screen trials, the
    recipe best at full fidelity in 7 of the 10."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if on_a_fraction(getattr(trial, "config", None) or {}):
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        if on_a_fraction(getattr(trial, "config", None) or {}):
            return super().on_trial_remove(tune_controller, trial)  # forgets it without a record
        return super().on_trial_complete(tune_controller, trial, result)


def make_scheduler(kind: str, max_t: int, grace_period: int, reduction_factor: int) -> ASHAScheduler | FIFOScheduler:
    if kind == "fifo":  # every trial runs its whole schedule: the baseline ASHA is measured against
        return FIFOScheduler()
    return FullFidelityASHA(time_attr=TIME_ATTR, metric=METRIC, mode=MODE, max_t=max_t,
                         grace_period=min(grace_period, max_t), reduction_factor=reduction_factor)
