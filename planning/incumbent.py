"""An Optuna sampler that searches around the incumbent: most proposals are small moves of the best
full-fidelity config, some move the runner-up, the rest come from a model-based sampler (TPE).
Sources: incumbent-local sampling mixed with a model once a full-fidelity result exists (PriorBand, Mallik
et al. 2023), but a move changes 1-2 names, not each with p 0.5 (too large for 15+ names and a 10-20 trial
budget); the step doubled on success, halved after 2 failures (CFO/FLOW2, Wu et al. 2021; FLAML halves after
2·dim), a flat move (its parent's val_acc and val_loss both) counted neither way and its name not moved from that
parent again (ours: a head-only fit's weight decay, say, changes nothing, and counted as a failure it halved the
step of the moves that matter); no repeat of a running or finished config (TPE's constant liar, by rejection
here); a name a move opens (a stage its parent did not run) starts from a prior, not the model's draw: the
new stage's lr a tenth of the stage before it (LP-FT, Kumar et al., ICLR 2022: fine-tune a probed head's network
at a smaller lr; the mobilenetv2_2stage_128 recipe: 1e-3 then 1e-4), the rest the parent's own values (ours: TPE
drew stage-2 lrs of 0.05-0.08 for the frozen recipe's moves, which diverged in 3 of the ten setting-2
duel runs of BENCHMARKS.md, 2026-12-07). Its state lives in the study's trial attributes, so a resume, optuna-dashboard and `--warm-start DIR` read
the same history."""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from analysis.outcome import screen_order
from analysis.study import CAL_LOSS_ATTR, EXTRA_ATTR, FIDELITY_ATTR, LOSS_ATTR, MOVE_ATTR, WARM_CONFIG
from trainable.config import RUN_FIELDS, TrialConfig

STEP_LOG_DECADES = 0.4  # a log-scaled float's move at step 1: +-0.4 decade (x2.5), +-25 %
STEP_LINEAR = 0.2  # a linear float's move at step 1: +-0.2 of its range, +-25 %
P_TWO = 0.25  # a move changes one name, else two (never a non-ordinal categorical with another)
P_FOLLOW = 0.5  # a move that beat its parent is repeated, one that did not is reversed (pattern search)
# each kind's share of a move's picks, split among its names: log floats are the learning rates, which matter
# most in fine-tuning (Li et al., ICLR 2020; Google's Tuning Playbook); a categorical resample is the largest move
KIND_SHARE = {"log": 0.5, "ordinal": 0.25, "linear": 0.15, "categorical": 0.1}
FLAT_LOSS = 1e-3  # a move is flat when its val_loss is within this fraction of its parent's (and val_acc equal)
# at most 0.8 decade (x6) for a learning rate: over every 1x setting-2 duel run (BENCHMARKS.md), moves at
# step 4 (1.6 decades, x40) beat their parent 0 times in 9, at 2 4 in 25, at 1 21 in 64, at 0.5 5 in 15
MAX_STEP = 2.0
NEW_STAGE_LR = 0.1  # a stage a move opens starts at this times the lr of the stage before it
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrialConfig)}


def screen_trial(t: FrozenTrial) -> bool:
    """A trial of the screen: planned on a fraction of the training data."""
    return t.user_attrs.get(FIDELITY_ATTR, 1.0) < 1.0


def full_fidelity(t: FrozenTrial) -> bool:
    return t.state == TrialState.COMPLETE and not screen_trial(t)


def ranked(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Full-fidelity trials, best first (the incumbent, then the runners-up)."""
    return sorted((t for t in trials if full_fidelity(t) and t.value is not None), key=lambda t: -t.value)


def screened(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Screen trials (low fidelity) that ended, best first (analysis.outcome.screen_order: by their calibrated loss):
    the ones promoted, and a stand-in incumbent until a full-fidelity one exists."""
    done = [t for t in trials if screen_trial(t)
            and t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.intermediate_values]
    return sorted(done, key=lambda t: screen_order(t.last_step, t.user_attrs.get(CAL_LOSS_ATTR), t.user_attrs.get(LOSS_ATTR),
                                                   t.intermediate_values[t.last_step]))


def kind(dist: BaseDistribution) -> str:
    """"log", "linear", "ordinal" (ints and sorted numeric choices) or "categorical"."""
    if isinstance(dist, FloatDistribution):
        return "log" if dist.log else "linear"
    if isinstance(dist, IntDistribution) or _ordinal(list(dist.choices)):
        return "ordinal"
    return "categorical"


def move(value: Any, dist: BaseDistribution, step: float, rng: np.random.Generator, sign: int = 0) -> Any:
    """One parameter's move at step multiplier `step`, up (`sign` 1), down (-1) or either (0), inside `dist`
    (inward at an edge). Floats move a fixed length +-25 % (CFO: a move below the val noise teaches nothing)."""
    sign = sign or int(rng.choice([-1, 1]))
    if isinstance(dist, FloatDistribution):
        length = step * rng.uniform(0.75, 1.25)
        if dist.log:
            up, down = float(value) * 10 ** (STEP_LOG_DECADES * length), float(value) / 10 ** (STEP_LOG_DECADES * length)
        else:
            d = STEP_LINEAR * length * (dist.high - dist.low)
            up, down = float(value) + d, float(value) - d
        options = [v for v in ((up, down) if sign > 0 else (down, up)) if dist.low <= v <= dist.high]
        return options[0] if options else min(max(up if sign > 0 else down, dist.low), dist.high)
    k = max(1, round(step))
    if isinstance(dist, IntDistribution):
        options = [v for v in ((value + k, value - k) if sign > 0 else (value - k, value + k)) if dist.low <= v <= dist.high]
        return int(options[0]) if options else value
    choices = list(dist.choices)
    if _ordinal(choices) and value in choices:  # input size, batch size, weight decay, stage split
        i = choices.index(value)
        options = [choices[j] for j in ((i + k, i - k) if sign > 0 else (i - k, i + k)) if 0 <= j < len(choices)]
        return options[0] if options else value
    others = [c for c in choices if c != value]
    return others[rng.integers(len(others))] if others else value


def direction(old: Any, new: Any, dist: BaseDistribution) -> int:
    """+1 when a move went up (in value, or along an ordinal list), -1 down, 0 for a categorical."""
    if kind(dist) == "categorical":
        return 0
    if isinstance(dist, CategoricalDistribution):
        old, new = dist.choices.index(old), dist.choices.index(new)
    return 1 if new > old else -1


def _ordinal(choices: list[Any]) -> bool:
    nums = [c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
    return len(nums) == len(choices) > 2 and nums == sorted(nums)


def step_size(trials: list[FrozenTrial]) -> float:
    """The current step multiplier from the history of local moves (CFO): doubled after a move
    that beat its parent, halved after two moves in a row that did not (a flat move is neither); within
    [1/8, MAX_STEP]."""
    step, fails = 1.0, 0
    for t in sorted(trials, key=lambda t: t.number):
        m = t.system_attrs.get(MOVE_ATTR)
        if not m or m.get("kind") != "local" or t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or _flat(t):
            continue
        if _beat_parent(t):
            step, fails = min(MAX_STEP, step * 2), 0
        else:
            fails += 1
            if fails % 2 == 0:
                step = max(0.125, step / 2)
    return step


class IncumbentSampler(BaseSampler):
    """With probability `p_local` a move of the incumbent (the best full-fidelity trial, else the best screen
    trial), `p_runner_up` one of the second best, else `model`'s proposal, as is every one before a trial ends."""

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
        for tries in range(50):
            plan = _follow(parent, trials, rng) if tries == 0 else None
            chosen = plan or _pick(parent, trials, rng)
            params = dict(parent.params)
            for n, sign in chosen.items():
                params[n] = move(params[n], parent.distributions[n], step, rng, sign)
            if params != parent.params and not any(_same(params, p) for p in seen):
                break
        else:
            return None  # every nearby point has been tried: let the model propose
        dirs = {n: direction(parent.params[n], params[n], parent.distributions[n]) for n in chosen
                if params[n] != parent.params[n]}
        # the parent's fields the space does not sample (a recipe's augment list, warm-up, patience)
        # go with it; run fields (its train_fraction above all) come from the search, not the parent
        extra = {**parent.user_attrs.get(WARM_CONFIG, {}), **parent.user_attrs.get(EXTRA_ATTR, {})}
        extra = {k: v for k, v in extra.items() if k not in parent.params and k not in RUN_FIELDS}
        return {"kind": "local", "parent": parent.number, "parent_value": _value(parent),
                "parent_loss": parent.user_attrs.get(LOSS_ATTR),
                "parent_full": full_fidelity(parent), "changed": sorted(dirs),
                "dirs": dirs, "step": step, "params": params, "extra": extra}

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
        if m is not None:  # a name the parent did not have: its move opened a conditional stage
            v = opened(param_name, m, param_distribution)
            if v is not None:
                return v
        return self.model.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._moves.pop(trial.number, None)
        self.model.after_trial(study, trial, state, values)


def opened(name: str, m: dict[str, Any], dist: BaseDistribution) -> Any | None:
    """The value of `name`, which move `m` opened (its parent did not sample it): a stage's lr NEW_STAGE_LR times
    the nearest earlier stage's lr among the parent's params, clipped into `dist`; another name the parent's
    unsampled value (its recipe's, else TrialConfig's default); None where there is none inside `dist`."""
    lr = re.fullmatch(r"stage(\d)_lr", name)
    if lr:
        before = [m["params"][f"stage{k}_lr"] for k in range(int(lr[1]) - 1, 0, -1) if f"stage{k}_lr" in m["params"]]
        v = before[0] * NEW_STAGE_LR if before else None
        if v is not None and isinstance(dist, FloatDistribution):
            return min(max(v, dist.low), dist.high)
    else:
        v = m.get("extra", {}).get(name, DEFAULTS.get(name))
    return v if v is not None and _inside(v, dist) else None


def _beat_parent(t: FrozenTrial) -> bool:
    """A local move that beat its parent at the same (full) fidelity: a move of a screen trial is
    never a success, as its parent's value was measured on a fraction of the data."""
    m = t.system_attrs.get(MOVE_ATTR) or {}
    return (m.get("kind") == "local" and m.get("parent_full", False) and full_fidelity(t) and t.value is not None
            and t.value > m.get("parent_value", math.inf))


def _flat(t: FrozenTrial) -> bool:
    """A full-fidelity local move of a full-fidelity parent that changed neither val_acc nor (within FLAT_LOSS)
    val_loss: the names it moved do nothing the val split can see, at the parent's plan."""
    m = t.system_attrs.get(MOVE_ATTR) or {}
    loss, parent_loss = t.user_attrs.get(LOSS_ATTR), m.get("parent_loss")
    return (m.get("kind") == "local" and m.get("parent_full", False) and full_fidelity(t)
            and t.value == m.get("parent_value") and loss is not None and parent_loss is not None
            and abs(loss - parent_loss) <= FLAT_LOSS * abs(parent_loss))


def _follow(parent: FrozenTrial, trials: list[FrozenTrial], rng: np.random.Generator) -> dict[str, int] | None:
    """Pattern search (Hooke & Jeeves 1961; CFO tries -u after u fails): with probability P_FOLLOW, repeat the
    one-name move that made `parent` beat its parent, else reverse a failed one-name move of `parent` not yet reversed."""
    if rng.random() >= P_FOLLOW:
        return None
    own = parent.system_attrs.get(MOVE_ATTR) or {}
    if own.get("kind") == "local" and _beat_parent(parent) and len(own.get("dirs", {})) == 1:
        (name, sign), = own["dirs"].items()
        if sign and name in parent.params:
            return {name: sign}
    children = [t for t in trials if (t.system_attrs.get(MOVE_ATTR) or {}).get("parent") == parent.number]
    tried = {(n, s) for t in children for n, s in t.system_attrs[MOVE_ATTR].get("dirs", {}).items()}
    for t in children:
        dirs = t.system_attrs[MOVE_ATTR].get("dirs", {})
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not _beat_parent(t) and not _flat(t) and len(dirs) == 1:
            (name, sign), = dirs.items()
            if sign and (name, -sign) not in tried and name in parent.params:
                return {name: -sign}
    return None


def _pick(parent: FrozenTrial, trials: list[FrozenTrial], rng: np.random.Generator) -> dict[str, int]:
    """One name (two with probability P_TWO, never a categorical with another), weighted by its kind's KIND_SHARE
    times 1 + its moves that beat their parent (adaptive operator selection); directions either way. A name whose
    one-name move of `parent` was flat is left out while another is left."""
    moves = [t.system_attrs[MOVE_ATTR] for t in trials if _flat(t)]
    flat = {m["changed"][0] for m in moves if m.get("parent") == parent.number and len(m.get("changed", [])) == 1}
    names = [n for n in sorted(parent.params) if n not in flat] or sorted(parent.params)
    wins = Counter(n for t in trials if _beat_parent(t) for n in t.system_attrs[MOVE_ATTR].get("changed", []))
    kinds = {n: kind(parent.distributions[n]) for n in names}
    per_kind = {k: sum(1 for n in names if kinds[n] == k) for k in KIND_SHARE}
    w = np.array([KIND_SHARE[kinds[n]] / per_kind[kinds[n]] * (1 + wins[n]) for n in names])
    first = names[rng.choice(len(names), p=w / w.sum())]
    chosen = {first: 0}
    rest = [i for i, n in enumerate(names) if n != first and kinds[n] != "categorical"]
    if kinds[first] != "categorical" and rest and rng.random() < P_TWO:
        chosen[names[rng.choice(rest, p=w[rest] / w[rest].sum())]] = 0
    return chosen


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
