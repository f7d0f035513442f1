"""Optuna's define-by-run function over a space, Optuna made quiet and earlier experiments' trials as this space's:
the part of the searcher that needs no Ray, shared by the searcher behind Ray (search/searcher.py), the precheck
and the cost estimate; and what --warm-start gives the searcher first."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna

from analysis.experiment import load_trials
from analysis.study import EXTRA_ATTR, METRIC, WARM_CONFIG
from planning.settings import SearchSettings
from spaces import Options, Space, Suggest, complete_config
from spaces.warm_start import OutsideSpace, as_point, fit_epochs, recipe_points
from trainable.errors import UserError


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


def warm_start(s: SearchSettings, space: Space, opts: Options, fixed: dict[str, Any], base: dict[str, Any]) -> tuple[list, list]:
    """(recipe points to enqueue, earlier experiments' trials to tell the searcher) from
    --warm-start recipes|none|DIR[,DIR...] (items may be combined: recipes,runs/old)."""
    whole = Path(s.warm_start).expanduser()  # one folder whose name holds a comma
    items = [s.warm_start] if "," in s.warm_start and whole.is_dir() else \
        [i.strip() for i in s.warm_start.split(",") if i.strip()] or ["none"]
    if "none" in items and len(items) > 1:
        raise UserError(f"--warm-start {s.warm_start!r}: 'none' cannot be combined with other items")
    points, dirs = [], []
    for item in items:
        if item == "recipes" and not space.recipe:  # a recipe run is its own warm start
            points, skipped = recipe_points(space, opts, base, fixed)
            print(f"warm start: {len(points)} recipe point(s) run first"
                  + (f"; {len(skipped)} recipe(s) are not points of this space" if skipped else ""))
            for line in skipped:
                print(f"  not a point of the space: {line}")
        elif item not in ("recipes", "none"):
            d = Path(item).expanduser().resolve()
            if not (d.is_dir() and any(d.glob("*/params.json"))):
                raise UserError(f"--warm-start {item}: not an experiment folder with trials "
                                f"(pass runs/NAME, 'recipes' or 'none')")
            dirs.append(d)
    told = []
    if dirs:
        told, skipped = told_trials(dirs, space, opts, fixed)
        print(f"warm start: the searcher is told {len(told)} finished trial(s) of "
              f"{', '.join(d.name for d in dirs)}" + (f" ({len(skipped)} not points of this space)" if skipped else ""))
    return points, told
