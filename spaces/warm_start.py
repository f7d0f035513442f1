"""Warm start from expert knowledge: the hand-made recipes as the first points of a search (PriorBand,
Mallik et al. 2023; Quick-Tune, Arango et al. 2024). Each pretrained recipe is one point per backbone it
can run on, its epochs scaled into the trial's budget and replayed through the space's sample function:
that yields the parameters Optuna must be told and proves the recipe is a point of the space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from spaces import RECIPES, Options, Space, Suggest, get_space, recipe_config, scale_epochs, space_view
from trainable.config import TrialConfig

_STAGE_EPOCHS = ("stage1_epochs", "stage2_epochs", "stage3_epochs")


@dataclass(frozen=True)
class WarmPoint:
    name: str  # "recipe@backbone"
    config: dict[str, Any]  # the complete TrialConfig dict the trial runs (its params.json)
    params: dict[str, Any]  # what the space samples, as Optuna must be told it
    distributions: dict[str, Any]  # each param's Optuna distribution, as the space asks for it


class OutsideSpace(ValueError):
    """A recipe value the space cannot express (a name it does not sample, or a value outside
    the name's range or choices)."""


def fit_epochs(config: dict[str, Any], budget: int) -> dict[str, Any]:
    """`config` with its stage epochs scaled to sum to `budget` (each stage that had epochs keeps >= 1, largest
    remainders get the rest), its patiences by the same factor; ValueError when `budget` is below its stages."""
    cfg = TrialConfig.from_dict(config)
    keys = [k for k in _STAGE_EPOCHS if getattr(cfg, k) > 0]
    if budget < len(keys):
        raise ValueError(f"a budget of {budget} epochs is fewer than the {len(keys)} stages of the plan")
    total = sum(getattr(cfg, k) for k in keys)
    exact = {k: getattr(cfg, k) * budget / total for k in keys}
    out = {k: max(1, math.floor(v)) for k, v in exact.items()}
    while sum(out.values()) > budget:  # the max(1, ...) floors overshot: take from the largest
        k = max((k for k in keys if out[k] > 1), key=lambda k: out[k])
        out[k] -= 1
    # largest remainder first; on a tie the later stage (stage 2 gets what stage 1 leaves, as in
    # the spaces, and stage 1 stays within their cap)
    for k in sorted(keys, key=lambda k: (exact[k] - math.floor(exact[k]), keys.index(k)), reverse=True):
        if sum(out.values()) == budget:
            break
        out[k] += 1
    # patiences scale as analyze --epochs-scale scales them; the stage epochs are the exact split above
    return {**scale_epochs(config, budget / total), **out}


class _Replay:
    """An Optuna trial that answers every suggest_* with the config's value, checked to lie inside the
    distribution (optuna's FixedTrial only warns on a value outside it)."""

    def __init__(self, config: dict[str, Any]):
        self.config = space_view(config)
        self.params, self.distributions = {}, {}

    def _answer(self, name: str, dist: Any) -> Any:
        if name not in self.config:
            raise OutsideSpace(f"the space samples {name}, which the recipe does not set")
        v = self.config[name]
        ok = (v in dist.choices if isinstance(dist, CategoricalDistribution)
              else isinstance(v, (int, float)) and not isinstance(v, bool) and dist.low <= v <= dist.high)
        if not ok:
            raise OutsideSpace(f"{name}={v!r} is outside the space's {dist}")
        self.params[name], self.distributions[name] = v, dist
        return v

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        return self._answer(name, FloatDistribution(low, high, log=log))

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return self._answer(name, IntDistribution(low, high))

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return self._answer(name, CategoricalDistribution(list(choices)))


def as_point(name: str, config: dict[str, Any], space: Space, opts: Options, fixed: dict[str, Any]
             ) -> WarmPoint:
    """`config` as a point of `space`: the parameters the space samples, each inside its
    distribution, and the complete config. Raises OutsideSpace when it is not one."""
    total = sum(int(config.get(k, 0)) for k in _STAGE_EPOCHS)
    if total != opts.max_epochs:  # --set stage epochs can break the fitted split; ASHA's max_t is the budget
        raise OutsideSpace(f"its stages add up to {total} epochs, not the {opts.max_epochs} every trial gets")
    replay = _Replay(config)
    chosen = space.sample(Suggest(replay, fixed), opts)
    for k, v in chosen.items():  # values the space derives (e.g. stage 2's epochs) must agree too
        if k not in fixed and config.get(k) != v:
            raise OutsideSpace(f"the space derives {k}={v!r} where the recipe has {config.get(k)!r}")
    return WarmPoint(name, config, replay.params, replay.distributions)


def recipe_points(space: Space, opts: Options, base: dict[str, Any], fixed: dict[str, Any]
                  ) -> tuple[list[WarmPoint], list[str]]:
    """The pretrained recipes as points of `space`, backbone-major (every recipe on the first, cheapest allowed
    backbone first), and one line per recipe that is not one. `base` (search-wide) and `fixed` (--set) win."""
    skipped, seen = [], set()
    found: list[tuple[int, WarmPoint]] = []
    for recipe in RECIPES:
        own = get_space(recipe).backbones
        cfg0 = recipe_config(recipe, base=base)
        if cfg0["pretrained"] != base.get("pretrained", True):
            continue  # a from-scratch recipe in a fine-tuning search, or the other way round
        backbones = [b for b in own if b in opts.backbones] or list(opts.backbones)
        if "backbone" in fixed:
            backbones = [fixed["backbone"]]
        for b in backbones:
            try:
                cfg = fit_epochs({**cfg0, "backbone": b}, opts.max_epochs)
                cfg = TrialConfig.from_dict({**cfg, **base, **fixed}).to_dict()
                point = as_point(f"{recipe}@{b}", cfg, space, opts, fixed)
            except (OutsideSpace, ValueError) as e:
                skipped.append(f"{recipe}@{b}: {e}")
                continue
            key = tuple(sorted(cfg.items()))
            if key not in seen:  # --set can make two recipes the same point
                seen.add(key)
                found.append((list(opts.backbones).index(b) if b in opts.backbones else 0, point))
    return [p for _, p in sorted(found, key=lambda t: t[0])], skipped
