"""The Optuna study's SQLite database: any folder name opens it, a reader holding it never costs a
trial's value, a write locked out for good stops the search, and it follows a moved experiment."""
from __future__ import annotations

import pickle
import sqlite3
import threading
import time
from pathlib import Path

import optuna
import pytest

import analysis.study
from analysis.study import STUDY_NAME, StudyStorage, StudyUnwritable, resume_study_at, study_url
from search.searcher import make_searcher
from spaces import Options, get_space

BASE = {"pretrained": False, "weights_dir": "", "seed": 0, "compile": False}
TINY = get_space("tiny")
ODD_NAMES = ["a%20b", "sp ace", "100%", "q?x", "h#1", "{n}", "ünï", "semi;colon", "a'b\"c", "x" * 200]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_any_folder_name_opens_its_own_study(tmp_path, name):
    exp = tmp_path / name / "exp"
    exp.mkdir(parents=True)
    study = optuna.create_study(storage=StudyStorage(exp), study_name=STUDY_NAME)
    study.add_trial(optuna.trial.create_trial(value=0.5))
    assert (exp / "optuna.db").is_file() and list(tmp_path.rglob("optuna.db")) == [exp / "optuna.db"]
    assert optuna.load_study(study_name=STUDY_NAME, storage=study_url(exp)).best_value == 0.5  # readers' URL


def _searcher(exp: Path):
    return make_searcher(TINY, Options(TINY.backbones, 2), {}, BASE, 0, exp, [], [], "tpe")


def _hold(db: Path, seconds: float, started: threading.Event) -> None:
    """Another program writing the database: an exclusive transaction held for `seconds`."""
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    started.set()
    time.sleep(seconds)
    con.execute("ROLLBACK")
    con.close()


def test_the_study_is_in_wal_mode(tmp_path):
    _searcher(tmp_path)
    with sqlite3.connect(tmp_path / "optuna.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_lock_held_past_sqlites_5_s_does_not_cost_the_value(tmp_path):
    searcher = _searcher(tmp_path)
    searcher.suggest("t0")
    started = threading.Event()
    holder = threading.Thread(target=_hold, args=(tmp_path / "optuna.db", 7.0, started))
    holder.start()
    started.wait()
    with sqlite3.connect(tmp_path / "optuna.db", timeout=0) as reader:  # readers still read meanwhile
        assert reader.execute("SELECT count(*) FROM trials").fetchone()[0] == 1
    t0 = time.monotonic()
    searcher.on_trial_complete("t0", {"best_val_acc": 0.42})  # Ray's OptunaSearch tells the study here
    assert time.monotonic() - t0 > 5  # it waited for the lock
    holder.join()
    study = optuna.load_study(study_name=STUDY_NAME, storage=study_url(tmp_path))
    assert [(t.state, t.value) for t in study.trials] == [(optuna.trial.TrialState.COMPLETE, 0.42)]


def test_a_lock_never_released_stops_the_search(tmp_path, monkeypatch):
    monkeypatch.setattr(analysis.study, "BUSY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(analysis.study, "WRITE_RETRY_S", 2.0)
    searcher = _searcher(tmp_path)
    searcher.suggest("t0")
    started = threading.Event()
    holder = threading.Thread(target=_hold, args=(tmp_path / "optuna.db", 6.0, started))
    holder.start()
    started.wait()
    try:
        with pytest.raises(StudyUnwritable, match="stayed locked.*--resume"):  # not logged and dropped
            searcher.on_trial_complete("t0", {"best_val_acc": 0.42})
    finally:
        holder.join()


def test_the_storage_follows_a_moved_experiment(tmp_path, monkeypatch):
    monkeypatch.setattr(analysis.study, "_moved_to", [])
    old, new = tmp_path / "old" / "exp", tmp_path / "new place" / "exp 2"
    old.mkdir(parents=True)
    storage = StudyStorage(old)
    optuna.create_study(storage=storage, study_name=STUDY_NAME).add_trial(optuna.trial.create_trial(value=0.3))
    saved = pickle.dumps(storage)
    new.parent.mkdir()
    old.rename(new)
    old.parent.rmdir()
    resume_study_at(new)
    again = pickle.loads(saved)
    assert optuna.load_study(study_name=STUDY_NAME, storage=again).best_value == 0.3
    assert not old.parent.exists()  # nothing made at the old place
