"""The leaderboard as table rows: every trial, ranked ones first, with the parameters that matter."""
from __future__ import annotations

from typing import Any

from search.export import TrialRecord, rank
from search.searcher import METRIC

PARAMS = ["backbone", "stages", "unfreeze_depth", "input_size", "batch_size", "aug_strength",
          "stage1_lr", "stage2_lr", "stage3_lr"]
HEAD = ["#", "trial", "best val_acc", "@epoch", "epochs run/planned", "status"] + PARAMS
NUMERIC = {0, 2, 3} | {6 + i for i, k in enumerate(PARAMS) if k != "backbone"}


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


def leaderboard_rows(trials: list[TrialRecord]) -> list[list[str]]:
    ranked = rank(trials)
    rows = []
    for t in ranked + [t for t in trials if t not in ranked]:
        if t in ranked:
            head = [str(len(rows) + 1), t.trial_id, f"{t.best[METRIC]:.4f}", str(t.best["epoch"])]
        else:
            head = ["–", t.trial_id, "–", "–"]
        status = t.status + (f": {t.reason}" if t.reason else "")
        params = [fmt(t.config.get(k)) if k != "stage3_lr" or t.config.get("stages") == 3 else "–"
                  for k in PARAMS]
        rows.append(head + [f"{t.epochs_run}/{t.planned_epochs}", status] + params)
    return rows
