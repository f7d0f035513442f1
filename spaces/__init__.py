"""Search spaces and fixed recipes, one file each, registered here by name.

A space is a define-by-run function over TrialConfig's field names: it asks a `Suggest` for values
(Optuna samples them, or `--set KEY=VALUE` fixes them) and returns the values it chose. Fields it
does not mention keep TrialConfig's defaults. Conditional parameters (stage 3's) are asked only when
they exist, so Optuna's TPE never sees a meaningless value.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

from trainable.config import TrialConfig
from trainable.errors import UserError

SEARCH_SPACES = ("default", "cpu", "tiny", "faults")
RECIPES = ("mobilenetv2_2stage_128", "mobilenetv2_2phase_96", "efficientnetv2_frozen", "resnet18_scratch",
           "vgg13_scratch", "alexnet_scratch", "efficientnetv2s_coarse_fine", "resnet50_3stage_224",
           "bit_hyperrule", "efficientnetv2_cifar")
NAMES = SEARCH_SPACES + RECIPES
LISTED = tuple(n for n in NAMES if n != "faults")  # faults: test scaffolding, --space faults still runs it


class Suggest:
    """Optuna's suggest_* with the --set values (typed as TrialConfig's fields: a space compares
    them) returned, not sampled."""

    def __init__(self, trial: Any, fixed: dict[str, Any] | None = None):
        self.trial, self.fixed = trial, fixed or {}

    def float(self, name: str, low: float, high: float, log: bool = False) -> float:
        if name in self.fixed:
            return float(self.fixed[name])
        return low if low == high else self.trial.suggest_float(name, low, high, log=log)

    def int(self, name: str, low: int, high: int) -> int:
        if name in self.fixed:
            return int(self.fixed[name])
        return low if low >= high else self.trial.suggest_int(name, low, high)

    def cat(self, name: str, choices: Sequence[Any]) -> Any:
        if name in self.fixed:
            return self.fixed[name]
        return choices[0] if len(choices) == 1 else self.trial.suggest_categorical(name, list(choices))


@dataclass(frozen=True)
class Options:
    """What the user narrowed: the backbones to choose from and the epoch budget per trial."""
    backbones: tuple[str, ...]
    max_epochs: int


def one_epoch(max_epochs: int) -> int:
    """Stage 1 is one epoch whatever the budget (the tiny and test spaces)."""
    return 1


@dataclass(frozen=True)
class Space:
    name: str
    description: str
    backbones: tuple[str, ...]
    max_epochs: int  # default epoch budget per trial (all stages)
    min_epochs: int  # the fewest epochs a trial of this space can have
    sample: Callable[[Suggest, Options], dict[str, Any]]
    recipe: bool = False  # a fixed recipe: its epochs are part of it, not a budget to fill
    # the longest head-only stage 1 of a plan that unfreezes blocks, for an epoch budget; ASHA's
    # first rung comes after it (search/searcher.py `stage_aware_grace`)
    longest_stage1: Callable[[int], int] = one_epoch  # a module-level function: Tune pickles spaces


def _recipe_sample(values: dict[str, Any], s: Suggest, o: Options) -> dict[str, Any]:
    return {"backbone": s.cat("backbone", o.backbones), **values}


def recipe(name: str, description: str, backbone: str, **values: Any) -> Space:
    """A fixed recipe: TrialConfig `values` on `backbone` (or those --backbones allows); its epochs are its own."""
    epochs = TrialConfig(**values).total_epochs
    return Space(name=name, description=description, backbones=(backbone,), max_epochs=epochs, min_epochs=epochs,
                 sample=partial(_recipe_sample, values), recipe=True)


def narrow(space: Space, backbones: str, max_epochs: int | None) -> Options:
    """The user's narrowing of `space`: `backbones` comma-separated ('' = all of the space's) and `max_epochs`
    per trial over all stages (None: the space's; a recipe keeps its own, checked by the precheck).
    Raises UserError for a backbone outside the space, or fewer epochs than one per stage."""
    chosen = tuple(b.strip() for b in backbones.split(",") if b.strip()) or space.backbones
    unknown = [b for b in chosen if b not in space.backbones]
    if unknown:
        raise UserError(f"--backbones {','.join(unknown)} not in space {space.name!r}: "
                        f"choose from {','.join(space.backbones)}")
    if max_epochs is None or space.recipe:
        return Options(chosen, space.max_epochs)
    if max_epochs < space.min_epochs:
        raise UserError(f"--max-epochs {max_epochs} is fewer than space {space.name!r} needs "
                        f"({space.min_epochs}: one epoch per stage at least): raise it")
    return Options(chosen, max_epochs)


def get_space(name: str) -> Space:
    if name not in NAMES:
        raise UserError(f"unknown space {name!r}: choose one of {', '.join(LISTED)} (--list-spaces)")
    return importlib.import_module(f"spaces.{name}").SPACE


_PATIENCES = ("early_stop_patience", "plateau_patience")


def scale_epochs(config: dict[str, Any], factor: float) -> dict[str, Any]:
    """Every stage's epochs (and the patiences counted in epochs) times `factor`, rounded; a stage
    or patience that was on keeps at least 1. Raises UserError for a factor that is not > 0."""
    if not (factor > 0 and math.isfinite(factor)):
        raise UserError(f"--epochs-scale {factor} must be a number > 0")
    out = dict(config)
    for key in ("stage1_epochs", "stage2_epochs", "stage3_epochs", *_PATIENCES):
        if out.get(key, 0) > 0:
            out[key] = max(1, round(out[key] * factor))
    return out


def recipe_config(name: str, fixed: dict[str, Any] | None = None, base: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """A fixed recipe's complete config: TrialConfig defaults < `base` < the recipe < `fixed` (typed)."""
    space = get_space(name)
    if not space.recipe:
        raise UserError(f"{name} is a search space, not a recipe: choose from {', '.join(RECIPES)}")
    chosen = space.sample(Suggest(None, fixed), Options(space.backbones, space.max_epochs))
    return complete_config(chosen, base=base, fixed=fixed)


def complete_config(chosen: dict[str, Any], *, base: dict[str, Any] | None = None, point: dict[str, Any] | None = None,
                    fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """A trial's complete, validated config: TrialConfig defaults < `base` (the search-wide run fields) < `point`
    (a planned point's fields the space does not sample) < `chosen` (the space's sample) < `fixed` (--set).
    Raises UserError for a config TrialConfig refuses."""
    return TrialConfig.from_dict({**(base or {}), **(point or {}), **chosen, **(fixed or {})}).to_dict()


def space_view(config: dict[str, Any]) -> dict[str, Any]:
    """`config` as a space's Optuna params see it: its fields and the structural choice "stages"
    the spaces sample (3 when stage 3 has epochs), so params can be matched against a config."""
    return {**config, "stages": 3 if config.get("stage3_epochs", 0) > 0 else 2}


def stage_count(s: Suggest, sample: bool = True, max_epochs: int | None = None) -> int:
    """2 or 3 stages: a structural choice Optuna samples as "stages" (when `sample`), unless --set
    stage3_epochs decides it, or --set stage1_epochs and stage2_epochs leave stage 3 what remains of
    `max_epochs` (a config's stage plan is its stage epochs alone)."""
    if "stage3_epochs" in s.fixed:
        return 3 if s.fixed["stage3_epochs"] > 0 else 2
    if max_epochs is not None and {"stage1_epochs", "stage2_epochs"} <= s.fixed.keys():
        return 3 if max_epochs > s.fixed["stage1_epochs"] + s.fixed["stage2_epochs"] else 2
    return s.cat("stages", [2, 3]) if sample else 2


def split_budget(s: Suggest, o: Options, stages: int, stage1_max: int) -> dict[str, int]:
    """Share the epoch budget among stages: every trial runs exactly o.max_epochs epochs, so ASHA
    compares trials on one time axis. Stage 2 gets what stages 1 and 3 leave."""
    e1 = s.int("stage1_epochs", 1, max(1, min(stage1_max, o.max_epochs - stages + 1)))
    e3 = s.int("stage3_epochs", 1, max(1, (o.max_epochs - e1) // 2)) if stages == 3 else 0
    return {"stage1_epochs": e1, "stage2_epochs": o.max_epochs - e1 - e3, "stage3_epochs": e3}
