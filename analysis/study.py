"""The metric trials report and the Optuna study the searcher keeps (search/searcher.py writes it, the
report reads it), and its SQLite storage, opened so that readers never cost the search a result."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy.engine import URL


METRIC, MODE = "val_acc", "max"  # what every trial reports each epoch (trainable/trial.py), and its direction
STUDY_FILE, STUDY_NAME = "optuna.db", "search"
WARM_CONFIG = "warm_start_config"  # user attr of an enqueued warm-start trial: its complete config
MOVE_ATTR = "cifar_tune:move"  # system attr of a local move (planning/incumbent.py): parent, changed names, step
EXTRA_ATTR = "extra_config"  # user attr of a local move: the parent's fields the space does not sample
FIDELITY_ATTR = "fidelity"  # user attr of a screen trial: its train_fraction (< 1)
LOSS_ATTR = "val_loss"  # user attr: a trial's last val_loss, beside its value (the local search's flat moves)
CAL_LOSS_ATTR = "val_cal_loss"  # user attr: a trial's last calibrated val loss (trainable.loop.evaluate): the screen's rank
TRIAL_ATTR = "tune_trial_id"  # user attr: the Tune trial the searcher proposed it for (its folder trial_ID)

BUSY_TIMEOUT_S = 60.0  # one write waits this long for another connection's lock (SQLite's default: 5 s)
WRITE_RETRY_S = 600.0  # a write still locked out is retried for this long, then the search stops


def study_path(exp: Path) -> Path:
    """The experiment's Optuna database file."""
    return Path(exp).resolve() / STUDY_FILE


def study_url(exp: Path) -> str:
    """The experiment's Optuna storage URL (SQLite), its path escaped as SQLAlchemy parses it back:
    a folder named `a%20b`, `x?y`, `#1` or `{n}` opens that folder."""
    return URL.create("sqlite", database=str(study_path(exp))).render_as_string(hide_password=False)


def load_study(exp: Path) -> optuna.Study | None:
    """The experiment's saved Optuna study; None without optuna.db."""
    if not (Path(exp) / STUDY_FILE).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=STUDY_NAME, storage=study_url(exp))


def by_trial_id(trials: list[optuna.trial.FrozenTrial]) -> dict[str, optuna.trial.FrozenTrial]:
    """{Tune trial id: its Optuna trial}: the trials this search ran (those told from --warm-start DIR
    ran in another experiment and have no Tune trial here)."""
    return {t.user_attrs[TRIAL_ATTR]: t for t in trials if TRIAL_ATTR in t.user_attrs}


def enable_wal(db: Path) -> None:
    """SQLite's write-ahead log for `db`, so readers (optuna-dashboard) and the searcher never block
    each other; left as it is while another connection holds the database (the next open retries)."""
    try:
        con = sqlite3.connect(db, timeout=BUSY_TIMEOUT_S)
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
    except sqlite3.OperationalError:
        pass


class StudyUnwritable(BaseException):
    """The study could not be written for WRITE_RETRY_S. A BaseException, not an Exception, so that
    no caller's `except Exception` drops it (Ray's OptunaSearch logs a failed tell as a warning and
    goes on, which would lose the trial's value): it stops the search."""


_moved_to: list[Path] = []  # the folder an experiment is resumed in (see `resume_study_at`)


def resume_study_at(exp: Path) -> None:
    """Study storages unpickled from now on (Ray's saved searcher, tuner.pkl) open `exp`/optuna.db,
    not the path the experiment had when it was saved: an experiment folder can be moved."""
    _moved_to[:] = [Path(exp).resolve()]


class StudyStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage of optuna.db (WAL, a long busy timeout, writes retried while another
    connection holds a lock) whose path follows the experiment folder when unpickled elsewhere."""

    def __init__(self, exp: Path):
        self.exp_dir = Path(exp).resolve()
        enable_wal(study_path(self.exp_dir))
        super().__init__(study_url(self.exp_dir), engine_kwargs={"connect_args": {"timeout": BUSY_TIMEOUT_S}})

    def __setstate__(self, state: dict[Any, Any]) -> None:
        if _moved_to and Path(state.get("exp_dir", "")) != _moved_to[0]:
            state = {**state, "exp_dir": _moved_to[0], "url": study_url(_moved_to[0])}
        enable_wal(study_path(state["exp_dir"]))
        super().__setstate__(state)


def _retried(name: str):
    method = getattr(optuna.storages.RDBStorage, name)

    def call(self: StudyStorage, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + WRITE_RETRY_S
        while True:
            try:
                return method(self, *args, **kwargs)
            except optuna.exceptions.StorageInternalError as e:
                text = f"{e} {e.__cause__ or e.__context__}".lower()
                if "locked" not in text and "busy" not in text:
                    raise
                if time.monotonic() >= deadline:
                    raise StudyUnwritable(
                        f"the Optuna study {study_path(self.exp_dir)} stayed locked by another program for "
                        f"{WRITE_RETRY_S:.0f} s: close what holds it (optuna-dashboard, sqlite3, a backup) "
                        f"and continue with --resume") from None
                time.sleep(1.0)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = method.__doc__
    return call


# every write the searcher makes (a tell is set_trial_state_values)
for _name in ("create_new_study", "set_study_user_attr", "set_study_system_attr", "create_new_trial",
              "set_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
              "set_trial_user_attr", "set_trial_system_attr"):
    setattr(StudyStorage, _name, _retried(_name))
