"""Optuna's define-by-run function over a space, and Optuna made quiet: the part of the searcher that needs no Ray,
shared by the searcher behind Ray (search/searcher.py), the precheck and the cost estimate."""
from __future__ import annotations

import warnings
from typing import Any

import optuna

from analysis.study import EXTRA_ATTR, WARM_CONFIG
from spaces import Options, Space, Suggest, complete_config


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
