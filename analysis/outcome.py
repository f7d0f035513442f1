"""How a trial ended: the one rule the console, TensorBoard, the leaderboard, the report and the plots
all use, over a view of a trial that a live Ray Tune trial and a trial folder on disk both give."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainable import atomic
from trainable.config import TrialConfig
from trainable.stages import plan_stages

COMPLETED = "completed"  # ran every planned epoch
PRUNED = "pruned"  # ASHA stopped it at a rung
EARLY_STOPPED = "early-stopped"  # its own val_loss patience ended its last stage
DIVERGED = "diverged"  # non-finite loss (trainable/trial.py reports status "diverged")
OOM = "oom"  # out of memory, past retrying (status "oom")
ERRORED = "errored"  # crashed past --max-failures (Tune's error.txt / Trial.ERROR)
INTERRUPTED = "interrupted"  # the search was stopped (Ctrl-C) while it ran
OUT_OF_BUDGET = "out of time budget"  # --time-budget ran out while it ran
RUNNING = "running"  # live only
PENDING = "pending"  # live only: waiting for resources or paused
NOT_STARTED = "not started"  # no epoch reported

FAILED = frozenset({DIVERGED, OOM, ERRORED})  # never a candidate; counted as failed
ENDED_BY_SEARCH = frozenset({INTERRUPTED, OUT_OF_BUDGET})
_ALL = frozenset({COMPLETED, PRUNED, EARLY_STOPPED, RUNNING, PENDING, NOT_STARTED}) | FAILED | ENDED_BY_SEARCH
ENDS_FILE = "trial_ends.json"  # {trial_id: INTERRUPTED | OUT_OF_BUDGET}, written by search/progress.py


@dataclass(frozen=True)
class TrialView:
    """What the rule needs of a trial. `last`: the row that ended it (its failure row, else its last;
    {} when none). `live`: Ray Tune's status while the search runs, "" on disk."""
    config: dict[str, Any]
    last: dict[str, Any] = field(default_factory=dict)
    errored: bool = False
    live: str = ""
    ended_by_search: str = ""


def failure_status(row: dict[str, Any]) -> str:
    """The failure a result row reports ("diverged", "oom"), "" for a normal epoch."""
    status = str(row.get("status", "ok"))
    return "" if status == "ok" else status


def planned_epochs(config: dict[str, Any]) -> int | None:
    """The trial's planned epochs over all stages; None for a config this code can't read."""
    try:
        return TrialConfig.from_dict(config).total_epochs
    except Exception:  # noqa: BLE001 - not this project's config: no plan to compare with
        return None


def on_a_fraction(config: dict[str, Any]) -> bool:
    """A screen trial: its plan runs on a fraction (train_fraction < 1) of the training data."""
    return float(config.get("train_fraction", 1.0)) < 1.0


def screen_order(epochs: int, last_cal_loss: Any, last_loss: Any, value: float) -> tuple[float, float, float, float]:
    """Sort key of screen trials, best first: more epochs run (a rung's value is no final one), then the lower last
    calibrated val loss (trainable.loop.evaluate), then the lower last val_loss, then the higher value. At a screen's
    fidelity (1-3 images a class) val_acc counts a handful of right answers among the val images, ties and all; the
    mean cross-entropy is continuous (setting 2 of BENCHMARKS.md's duel, 5 seeds: the recipe best at full fidelity
    ranked 3rd, 1st (tied), 2nd, 1st, 5th by val_acc, 1st, 1st, 2nd, 1st, 1st by val_loss), but it also counts
    confidence: recipes with label smoothing and mixup give near-uniform outputs early, near ln(100) when wrong,
    below a recipe that learned more (the fine-tuning duel, 2026-12-07: its best recipe came last of 3 by val_loss,
    first by val_top5). Calibrated, the loss compares what the models predict apart from their confidence
    (Ashukha et al., ICLR 2020). The screen's promotions and the export both rank by it."""
    return -epochs, finite_loss(last_cal_loss), finite_loss(last_loss), -value


def finite_loss(v: Any) -> float:
    """A val_loss as a sort key: the number, or inf for a missing, non-numeric or non-finite one (a diverged trial)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else math.inf


def low_fidelity(result: dict[str, Any]) -> bool:
    """A trial's last (flattened) result came below full fidelity: on a fraction of the data, or
    before its plan's last epoch without early-stopping itself."""
    config = {k.removeprefix("config/"): v for k, v in result.items() if k.startswith("config/")}
    if result.get("status", "ok") != "ok":
        return False  # a failure is told as a 0, everywhere, so the searcher avoids its region
    planned = planned_epochs(config) if config and "epoch" in result else None  # None: nothing to compare
    cut = planned is not None and int(result["epoch"]) < planned and not result.get("early_stopped")
    return cut or on_a_fraction(config)


def early_stopped(config: dict[str, Any], last: dict[str, Any]) -> bool:
    """The trial's own patience ended its last stage (and so the trial)."""
    try:
        last_stage = plan_stages(TrialConfig.from_dict(config))[-1].number
    except Exception:  # noqa: BLE001 - not this project's config
        return False
    return bool(last.get("early_stopped")) and last.get("stage") == last_stage


def outcome(v: TrialView) -> str:
    """How the trial ended (or where it is): one of the names above."""
    failure = failure_status(v.last)
    if failure:
        return failure
    reported = "epoch" in v.last  # a live trial that never ran still has Tune's bookkeeping row
    planned = planned_epochs(v.config)
    if reported and planned is not None and int(v.last["epoch"]) >= planned:
        return COMPLETED  # Tune leaves error.txt after a crash it recovered from, too
    if reported and early_stopped(v.config, v.last):
        return EARLY_STOPPED
    if v.errored:
        return ERRORED
    if v.live == "RUNNING":
        return RUNNING
    if v.live in ("PENDING", "PAUSED"):
        return PENDING
    if v.ended_by_search:
        return v.ended_by_search
    return PRUNED if reported else NOT_STARTED


def is_failure(name: str) -> bool:
    return name in FAILED or name not in _ALL


def read_ends(exp: Path) -> dict[str, str]:
    """{trial_id: INTERRUPTED | OUT_OF_BUDGET} for the trials the search's end cut short."""
    try:
        data = json.loads((Path(exp) / ENDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items() if v in ENDED_BY_SEARCH} if isinstance(data, dict) else {}


def write_ends(exp: Path, cut: dict[str, str], finished: set[str]) -> None:
    """Merge this run's cut-short trials into the file; trials that `finished` in this run (a
    resumed search ran them to their end) leave it."""
    ends = {k: v for k, v in read_ends(exp).items() if k not in finished}
    ends.update(cut)
    atomic.write_text(Path(exp) / ENDS_FILE, json.dumps(ends, indent=1, sort_keys=True) + "\n")
