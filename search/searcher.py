"""Optuna (TPE, seeded, define-by-run) proposes configs; ASHA stops weak trials early."""
from __future__ import annotations

from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from spaces import Options, Space, Suggest
from trainable.config import TrialConfig

METRIC, MODE = "val_acc", "max"
TIME_ATTR = "epoch"  # the epoch counter across all stages, reported by every trial


class DefineByRun:
    """Optuna's define-by-run function: sample the space, then return the complete resolved config
    (sampled values, --set values and TrialConfig defaults alike), so each trial's params.json can
    rerun it alone. A class, not a closure, because Tune pickles the searcher to resume it."""

    def __init__(self, space: Space, opts: Options, fixed: dict[str, Any], base: dict[str, Any]):
        self.space, self.opts, self.fixed, self.base = space, opts, fixed, base

    def __call__(self, trial: Any) -> dict[str, Any]:
        chosen = self.space.sample(Suggest(trial, self.fixed), self.opts)
        return TrialConfig.from_dict({**self.base, **chosen, **self.fixed}).to_dict()


def _quiet_optuna() -> None:
    """No 'study created' log line, and no warning that TPE's `group` option is experimental."""
    import warnings
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def make_searcher(space: Space, opts: Options, fixed: dict[str, Any], base: dict[str, Any],
                  seed: int) -> OptunaSearch:
    _quiet_optuna()
    # Optuna is told each trial's best epoch, not its last, so a trial ASHA stopped keeps its score
    return OptunaSearch(space=DefineByRun(space, opts, fixed, base), metric="best_val_acc", mode=MODE,
                        sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True))


def make_scheduler(kind: str, max_t: int, grace_period: int, reduction_factor: int
                   ) -> ASHAScheduler | FIFOScheduler:
    if kind == "fifo":  # every trial runs its whole schedule: the baseline ASHA is measured against
        return FIFOScheduler()
    return ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode=MODE, max_t=max_t,
                         grace_period=min(grace_period, max_t), reduction_factor=reduction_factor)
