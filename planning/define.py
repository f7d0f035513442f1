"""Optuna's define-by-run function over a space, Optuna made quiet and earlier experiments' trials as this space's:
the part of the searcher that needs no Ray, shared by the searcher behind Ray (search/searcher.py), the precheck
and the cost estimate."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna

from analysis.experiment import load_trials
from analysis.study import EXTRA_ATTR, METRIC, WARM_CONFIG
from spaces import Options, Space, Suggest, complete_config
from spaces.warm_start import OutsideSpace, as_point, fit_epochs


class DefineByRun:
    """Optuna's define-by-run function: the trial's complete, validated config (`spaces.complete_config`),
    so its params.json reruns it alone. A class, not a closure: Tune pickles the searcher to resume it."""

    def __init__(self, space: Space, opts: Options, fixed: dict[str, Any], base: dict[str, Any]):
        self.space, self.opts, self.fixed, self.base = space, opts, fixed, base

    def __call__(self, trial: Any) -> dict[str, Any]:
        chosen = self.space.sample(Suggest(trial, self.fixed), self.opts)
        # a planned point's unsampled fields (a recipe's augment list; a local move's parent's) live in the study
        attrs = getattr(trial, "user_attrs", {})
        point = attrs.get(WARM_CONFIG) or attrs.get(EXTRA_ATTR) or {}
        return complete_config(chosen, base=self.base, point=point, fixed=self.fixed)


def quiet_optuna() -> None:
    """No 'study created' log line, and no warning that TPE's `group` option is experimental."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def told_trials(dirs: list[Path], space: Space, opts: Options, fixed: dict[str, Any]) -> tuple[list, list[str]]:
    """Earlier experiments' finished trials as FrozenTrials of this space (value: best val_acc, 0 for a
    failure as in a search), their plans scaled to this budget; one line per trial outside the space."""
    frozen, skipped = [], []
    for d in dirs:
        for t in load_trials(d):
            if not t.results:
                continue
            value = float(t.best[METRIC]) if t.best is not None else 0.0
            try:
                p = as_point(f"{d.name}/{t.trial_id}", fit_epochs(t.config, opts.max_epochs), space, opts, fixed)
            except (OutsideSpace, ValueError) as e:
                skipped.append(f"{d.name}/{t.trial_id}: {e}")
                continue
            frozen.append(optuna.trial.create_trial(
                params=p.params, distributions=p.distributions, value=value,
                user_attrs={"warm_start": p.name, "status": t.status}))
    return frozen, skipped
