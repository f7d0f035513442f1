"""The leaderboard as table rows: every trial, ranked ones first, with the parameters that matter."""
from __future__ import annotations

from analysis.experiment import PARAM_COLUMNS, PARAM_HEADS, TrialRecord, param_cells, rank
from analysis.study import METRIC
from report.html import pct

HEAD = ["#", "trial", "best val_acc", "@epoch", "epochs run/planned", "status"] + PARAM_HEADS
NUMERIC = {0, 2, 3} | {6 + i for i, k in enumerate(PARAM_COLUMNS) if k not in ("backbone", "aug_strength")}  # aug: may be a list


def leaderboard_rows(trials: list[TrialRecord]) -> list[list[str]]:
    ranked = rank(trials)
    rows = []
    for t in ranked + [t for t in trials if t not in ranked]:
        if t in ranked:
            head = [str(len(rows) + 1), t.trial_id, pct(t.best[METRIC]), str(t.best["epoch"])]
        else:
            head = ["–", t.trial_id, "–", "–"]
        status = t.status + (f": {t.reason}" if t.reason else "")
        params = param_cells(t.config)
        rows.append(head + [f"{t.epochs_run}/{t.planned_epochs}", status] + params)
    return rows
