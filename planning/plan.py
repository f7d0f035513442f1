"""How a search spends its budget, decided before the first trial from the cost estimate. The recipe points
(the warm start) run first: whole when they fit in a third of the budget, else screened on a stratified
fraction of the training data with their whole stage plans (a data subset keeps stage 2, which fewer epochs
would cut off: FABOLAS, Klein et al. 2017), the best third then promoted to full fidelity (successive halving
among the priors, Jamieson & Talwalkar 2016). A point whose start-up and validation would be most of its screen run
runs whole instead: the screen saves little of it, and its whole run is a number the search can trust. A budget
too short for the screen and one promotion runs the points whole, cheapest first, so the most of them finish.
What is left is the searcher's (planning/incumbent.py)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from analysis.experiment import duration
from trainable import atomic

PLAN_FILE = "budget_plan.json"
ETA = 3  # the screen keeps the best 1/ETA of the recipe points
FIT_SHARE = 1 / 3  # recipe points run whole when they take at most this share of the budget
SCREEN_SHARE = 1 / 4  # else the screen is sized to about this share
MIN_FRACTION, MAX_FRACTION = 1 / 9, 1 / 3  # below 1/9 a per-class subset is 1-2 images on small splits
MIN_OWN_TRIALS = 3  # fewer trials of its own than this and the searcher learns nothing
# the screen's fraction f is sized as if a point's screen run cost f of its whole run; a point whose start-up and
# validation make its screen run cost more than this many times that runs whole (the screen would save little of
# it and rank it at ~1 image a class). The fine-tuning duel (BENCHMARKS.md, 2026-12-08): the best recipe (96 px)
# screened at 13 % cost 3.6x its share (47 % of its whole run), ranked 3rd-4th of 6 and never ran whole
SCREEN_OVERHEAD = 2.0


@dataclass(frozen=True)
class BudgetPlan:
    points: int  # recipe points
    screen_fraction: float  # the screen's train_fraction; 1.0: the points run whole (no screen)
    promote: int  # screened points promoted to full fidelity
    screen_s: float  # expected wall seconds of the points' first runs (the screen, or the whole runs)
    promote_s: float  # expected wall seconds of the promoted runs
    own_trial_s: float  # expected wall seconds per trial of the searcher's own (parallel trials counted)
    budget_s: float | None  # what is left of --time-budget when the plan is made (the checks and the estimate used the rest)
    num_samples: int | None  # --num-samples, if given
    own_s: float | None  # seconds left for the searcher's own proposals (None without a time budget)
    own_trials: int | None  # how many of them (None with neither a time budget nor --num-samples)
    setup_s: float = 0.0  # what the checks and the estimate took of --time-budget before the plan
    order: tuple[int, ...] = ()  # the points' run order (indices); (): as given. Cheapest first when the budget is tight
    whole: tuple[int, ...] = ()  # with a screen: the points (indices) that run whole instead (SCREEN_OVERHEAD)
    unfit_s: float = 0.0  # with `order`: what the screen and then one promoted point would have taken, in a row

    def fractions(self) -> list[float]:
        """Each point's train_fraction, in the order given to plan_budget."""
        return [1.0 if i in self.whole else self.screen_fraction for i in range(self.points)]

    def describe(self, sampler: str = "incumbent") -> str:
        """The plan in a few lines for the console; `sampler` names where the search's own proposals come from."""
        if self.order:
            lines = [f"budget plan: a screen and one promotion (~{duration(self.unfit_s)}, the promoted point after the "
                     f"screen) do not fit in {duration(self.budget_s or 0)}: the "
                     f"{self.points} recipe point(s) run whole, cheapest first, as many as the budget allows "
                     f"(~{duration(self.screen_s)} for all)"]
        elif self.screen_fraction >= 1:
            lines = [f"budget plan: the {self.points} recipe point(s) run whole first (~{duration(self.screen_s)})"]
        else:
            lines = [f"budget plan: screen {'the' if not self.whole else f'{self.points - len(self.whole)} of the'} "
                     f"{self.points} recipe point(s) on {self.screen_fraction:.0%} of the training data, whole stage "
                     f"plans (~{duration(self.screen_s)}),",
                     f"  then promote the best {self.promote} to full fidelity (~{duration(self.promote_s)})"]
            if self.whole:
                lines.insert(1, f"  the other {len(self.whole)} run whole: start-up and validation would be most of "
                                f"their screen runs")
        if self.own_trials is not None:
            left = f" (~{duration(self.own_s)})" if self.own_s is not None else ""
            source = "around the best config" if sampler == "incumbent" else f"from the {sampler} sampler"
            lines.append(f"  then the search's own proposals {source}: about {self.own_trials} trial(s){left}")
            if self.own_trials < MIN_OWN_TRIALS and self.budget_s is not None:
                lines.append(f"note: that is too few for the search to improve on the recipes; it gets "
                             f"{MIN_OWN_TRIALS * 2} trials of its own from about --time-budget "
                             f"{budget_text(self.budget_needed())}")
        return "\n".join(lines)

    def budget_needed(self) -> float:
        return self.setup_s + self.screen_s + self.promote_s + 2 * MIN_OWN_TRIALS * self.own_trial_s


def budget_text(seconds: float) -> str:
    """Seconds as a --time-budget value, rounded up to a whole minute: "9m", "1h05m"."""
    m = max(1, math.ceil(seconds / 60))
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m"


def wall(train_s: list[float], val_s: list[float], fraction: float, startup_s: float, parallel: int) -> float:
    """Expected wall seconds of running every point at `fraction` of the training data."""
    return (fraction * sum(train_s) + sum(val_s) + startup_s * len(train_s)) / parallel


def plan_budget(train_s: list[float], val_s: list[float], *, startup_s: float, parallel: int,
                own_trial_s: float, budget_s: float | None, num_samples: int | None,
                screen: str = "auto", setup_s: float = 0.0) -> BudgetPlan:
    """The plan for recipe points costing `train_s`/`val_s` seconds each at full fidelity, in `budget_s` (what is
    left of a time budget after `setup_s`). Without a time budget the points fit when they are at most a third of
    `num_samples` (16 when not given). `screen`: "auto", "on" (every point screened, even when they fit) or "off"."""
    n, parallel = len(train_s), max(1, parallel)
    given = dict(points=n, own_trial_s=own_trial_s / parallel, budget_s=budget_s, num_samples=num_samples,
                 setup_s=setup_s)
    full = wall(train_s, val_s, 1.0, startup_s, parallel)
    fits = full <= FIT_SHARE * budget_s if budget_s is not None else n <= FIT_SHARE * (num_samples or 16)
    fraction, promote, first_s, one_s, whole, screened = 1.0, 0, full, 0.0, (), []
    if n > 0 and (screen == "on" or (screen == "auto" and not fits)):
        fraction = MAX_FRACTION
        if budget_s is not None and sum(train_s) > 0:
            room = SCREEN_SHARE * budget_s * parallel - sum(val_s) - startup_s * n
            fraction = min(MAX_FRACTION, max(MIN_FRACTION, room / sum(train_s)))
        fraction = round(fraction, 3)
        whole = tuple(i for i in range(n) if screen == "auto" and fraction * train_s[i] + val_s[i] + startup_s
                      > SCREEN_OVERHEAD * fraction * (train_s[i] + val_s[i] + startup_s))
        screened = [i for i in range(n) if i not in whole]
        if len(screened) < 2:  # one point has nothing to be ranked against: it runs whole too
            whole, screened = tuple(range(n)), []
        promote = math.ceil(len(screened) / ETA)

        def run(points: list[int] | tuple[int, ...], at: float, at_once: int) -> float:
            return wall([train_s[i] for i in points], [val_s[i] for i in points], at, startup_s, at_once)
        first_s = run(whole, 1.0, parallel) + run(screened, fraction, parallel)
        one_s = run(screened, 1.0, 1) / len(screened) if screened else 0.0  # a promoted point, run whole
        if budget_s is not None and first_s + one_s > budget_s:  # the screen would end the search unfinished
            order = tuple(sorted(range(n), key=lambda i: train_s[i] + val_s[i]))
            return BudgetPlan(**given, screen_fraction=1.0, promote=0, screen_s=full, promote_s=0.0, own_s=0.0,
                              own_trials=0, order=order, unfit_s=first_s + one_s)
    promote_s = promote * one_s / parallel
    if not screened:  # every point runs whole
        fraction, whole = 1.0, ()
    own_wall = given["own_trial_s"]
    own_s = None if budget_s is None else max(0.0, budget_s - first_s - promote_s)
    if own_s is not None:
        own_trials = int(own_s / own_wall) if own_wall > 0 else 0
    else:
        own_trials = None if num_samples is None else max(0, num_samples - n - promote)
    return BudgetPlan(**given, screen_fraction=fraction, promote=promote, screen_s=first_s, promote_s=promote_s,
                      own_s=own_s, own_trials=own_trials, whole=whole)


def save(exp: Path, plan: BudgetPlan) -> None:
    exp.mkdir(parents=True, exist_ok=True)
    atomic.write_text(exp / PLAN_FILE, json.dumps(asdict(plan), indent=1) + "\n")
