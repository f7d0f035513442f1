"""Names every layer shares about a search's results: the metric trials report and the Optuna study
the searcher keeps (search/searcher.py writes it, report/importance.py reads it)."""
from __future__ import annotations

from pathlib import Path

METRIC, MODE = "val_acc", "max"  # what every trial reports each epoch (trainable/trial.py), and its direction
STUDY_FILE, STUDY_NAME = "optuna.db", "search"
WARM_CONFIG = "warm_start_config"  # user attr of an enqueued warm-start trial: its complete config
MOVE_ATTR = "cifar_tune:move"  # system attr of a local move (search/incumbent.py): parent, changed names, step
EXTRA_ATTR = "extra_config"  # user attr of a local move: the parent's fields the space does not sample
FIDELITY_ATTR = "fidelity"  # user attr of a screen trial: its train_fraction (< 1)


def study_url(exp: Path) -> str:
    """The experiment's Optuna storage URL (SQLite)."""
    return f"sqlite:///{Path(exp).resolve() / STUDY_FILE}"
