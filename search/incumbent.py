"""An Optuna sampler that searches around the incumbent: most proposals are small moves of the best
full-fidelity config, some move the runner-up, the rest come from a model-based sampler (TPE).

Where each rule comes from:
- incumbent-local sampling mixed with model-based sampling, started once a full-fidelity result
  exists: PriorBand (Mallik et al., NeurIPS 2023; automl/neps `priorband.py`). PriorBand mutates
  every hyper-parameter with probability 0.5; with 15+ hyper-parameters and a 10-20-trial budget
  that move is too large, so a move here changes 1 or 2 of them, as FLAML's CFO does.
- the step that grows after a success and shrinks after failures: CFO / FLOW2 (Wu et al., AAAI
  2021; microsoft/FLAML `flow2.py`: step doubled on improvement, halved after 2·dim failures; here
  after 2, for a budget of a few trials).
- learning rates in log space by a fraction of a decade, ordinal choices by one step,
  categoricals resampled: the encodings of PriorBand's and CFO's unit cube.
- no proposal repeats a running or finished config: the role of TPE's constant liar (Optuna),
  done by rejection here because a local move knows its candidates before it samples.

Its state (which trials were local moves, their parents, the step) lives in the study's trial
attributes, so a resumed search, optuna-dashboard and `--warm-start DIR` read the same history.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from analysis.study import EXTRA_ATTR, FIDELITY_ATTR, MOVE_ATTR, WARM_CONFIG
from trainable.config import RUN_FIELDS

STEP_LOG_DECADES = 0.25  # a log-scaled float's move: N(0, 0.25 decades) at step 1 (~x1.8)
STEP_LINEAR = 0.15  # a linear float's move: N(0, 0.15 of its range) at step 1


def full_fidelity(t: FrozenTrial) -> bool:
    return t.state == TrialState.COMPLETE and t.user_attrs.get(FIDELITY_ATTR, 1.0) >= 1.0


def ranked(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Full-fidelity trials, best first (the incumbent, then the runners-up)."""
    return sorted((t for t in trials if full_fidelity(t) and t.value is not None), key=lambda t: -t.value)


def screened(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Screen trials (low fidelity) that ended, best last value first: a stand-in incumbent until a
    full-fidelity one exists."""
    done = [t for t in trials if t.user_attrs.get(FIDELITY_ATTR, 1.0) < 1.0
            and t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.intermediate_values]
    return sorted(done, key=lambda t: (-t.last_step, -t.intermediate_values[t.last_step]))


def move(value: Any, dist: BaseDistribution, step: float, rng: np.random.Generator) -> Any:
    """One parameter's local move at step multiplier `step` (1 = the base step). The result is
    inside `dist` and differs from `value` where the distribution allows."""
    if isinstance(dist, FloatDistribution):
        for _ in range(20):
            if dist.log:
                v = float(value) * 10 ** rng.normal(0.0, STEP_LOG_DECADES * step)
            else:
                v = float(value) + rng.normal(0.0, STEP_LINEAR * step * (dist.high - dist.low))
            v = min(max(v, dist.low), dist.high)
            if not math.isclose(v, value, rel_tol=1e-3):
                return v
        return v
    if isinstance(dist, IntDistribution):
        k = max(1, round(step))
        options = [v for v in (value - k, value + k) if dist.low <= v <= dist.high]
        return int(rng.choice(options)) if options else value
    choices = list(dist.choices)
    if _ordinal(choices) and value in choices:  # input size, batch size, weight decay, stage split
        i, k = choices.index(value), max(1, round(step))
        options = [choices[j] for j in (i - k, i + k) if 0 <= j < len(choices)]
        return options[rng.integers(len(options))] if options else value
    others = [c for c in choices if c != value]
    return others[rng.integers(len(others))] if others else value


def _ordinal(choices: list[Any]) -> bool:
    nums = [c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
    return len(nums) == len(choices) > 2 and nums == sorted(nums)


def step_size(trials: list[FrozenTrial]) -> float:
    """The current step multiplier from the history of local moves (CFO): doubled after a move
    that beat its parent, halved after two moves in a row that did not; within [1/8, 4]."""
    step, fails = 1.0, 0
    for t in sorted(trials, key=lambda t: t.number):
        m = t.system_attrs.get(MOVE_ATTR)
        if not m or m.get("kind") != "local" or t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        if full_fidelity(t) and t.value is not None and t.value > m.get("parent_value", math.inf):
            step, fails = min(4.0, step * 2), 0
        else:
            fails += 1
            if fails % 2 == 0:
                step = max(0.125, step / 2)
    return step


class IncumbentSampler(BaseSampler):
    """Proposals: with probability `p_local` a move of the incumbent (the best full-fidelity
    trial, else the best screen trial), `p_runner_up` a move of the second best, else `model`'s
    (TPE). Before any trial has ended, every proposal is the model's (its start-up draws)."""

    def __init__(self, model: BaseSampler, seed: int = 0, p_local: float = 0.6, p_runner_up: float = 0.15):
        self.model, self.seed, self.p_local, self.p_runner_up = model, seed, p_local, p_runner_up
        self._moves: dict[int, dict[str, Any]] = {}  # trial number -> its move, while it samples

    def reseed_rng(self) -> None:
        self.model.reseed_rng()

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.model.before_trial(study, trial)
        if "fixed_params" in trial.system_attrs:  # an enqueued point: its params are given
            return
        m = self.plan(study.get_trials(deepcopy=False), trial.number)
        if m is not None:
            self._moves[trial.number] = m
            study._storage.set_trial_system_attr(trial._trial_id, MOVE_ATTR, m)  # as Optuna's own samplers do
            if m.get("extra"):
                study._storage.set_trial_user_attr(trial._trial_id, EXTRA_ATTR, m["extra"])
                # and in the frozen trial Optuna's Trial built before this call and reads attrs from
                trial.user_attrs[EXTRA_ATTR] = m["extra"]

    def plan(self, trials: list[FrozenTrial], number: int) -> dict[str, Any] | None:
        """The move for trial `number`, or None for a model proposal."""
        rng = np.random.default_rng([self.seed, number])
        best = ranked(trials) or screened(trials)
        if not best:
            return None
        u = rng.random()
        if u < self.p_local:
            parent = best[0]
        elif u < self.p_local + self.p_runner_up and len(best) > 1:
            parent = best[1]
        else:
            return None
        step = step_size(trials)
        seen = [t.params for t in trials if t.number != number]
        names = sorted(parent.params)
        for _ in range(50):
            k = min(len(names), 1 + int(rng.random() < 0.5))
            chosen = [names[i] for i in rng.choice(len(names), size=k, replace=False)]
            params = dict(parent.params)
            for n in chosen:
                params[n] = move(params[n], parent.distributions[n], step, rng)
            if params != parent.params and not any(_same(params, p) for p in seen):
                break
        else:
            return None  # every nearby point has been tried: let the model propose
        # the parent's fields the space does not sample (a recipe's augment list, warm-up, patience)
        # go with it; run fields (its train_fraction above all) come from the search, not the parent
        extra = {**parent.user_attrs.get(WARM_CONFIG, {}), **parent.user_attrs.get(EXTRA_ATTR, {})}
        extra = {k: v for k, v in extra.items() if k not in parent.params and k not in RUN_FIELDS}
        return {"kind": "local", "parent": parent.number, "parent_value": _value(parent), "changed": chosen,
                "step": step, "params": params, "extra": extra}

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        if trial.number in self._moves:
            return {}
        return self.model.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        if trial.number in self._moves:
            return {}
        return self.model.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name: str, param_distribution: BaseDistribution) -> Any:
        m = self._moves.get(trial.number)
        if m is not None and param_name in m["params"]:
            v = m["params"][param_name]
            if _inside(v, param_distribution):
                return v
        # a name the parent did not have (its move opened a conditional stage): the model's draw
        return self.model.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._moves.pop(trial.number, None)
        self.model.after_trial(study, trial, state, values)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same config on every name both have: the names that open a conditional stage are
    common to both, so equal common names mean equal stages."""
    common = set(a) & set(b)
    return bool(common) and all(a[k] == b[k] for k in common)


def _inside(v: Any, dist: BaseDistribution) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return v in dist.choices
    return isinstance(v, (int, float)) and not isinstance(v, bool) and dist.low <= v <= dist.high


def _value(t: FrozenTrial) -> float:
    if t.value is not None:
        return float(t.value)
    return float(t.intermediate_values[t.last_step]) if t.intermediate_values else -math.inf
