"""One trial outcome (analysis/outcome.py): every way a trial ends, read from a live Tune trial
and from its folder on disk, and shown alike by the console, TensorBoard, the leaderboard, the
report's leaderboard and the val_acc plot."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from analysis.experiment import leaderboard, load_trials
from analysis.outcome import (
    COMPLETED,
    DIVERGED,
    EARLY_STOPPED,
    ENDS_FILE,
    ERRORED,
    INTERRUPTED,
    NOT_STARTED,
    OOM,
    OUT_OF_BUDGET,
    PENDING,
    PRUNED,
    RUNNING,
    TrialView,
    outcome,
    read_ends,
    write_ends,
)
from report.build import leaderboard_rows
from report.curves import END_MARKER, STYLE
from search.progress import Progress, SearchLog, table_rows
from search.tensorboard import EpochTensorBoard
from trainable.config import TrialConfig

CONFIG = TrialConfig.from_dict({"stage1_epochs": 1, "stage2_epochs": 3, "early_stop_patience": 1}).to_dict()


def row(epoch: int, **kw) -> dict:
    return {"epoch": epoch, "stage": 1 if epoch == 1 else 2, "val_acc": 0.1 * epoch,
            "best_val_acc": 0.1 * epoch, "val_loss": 1.0, "status": "ok", **kw}


# name -> (result rows, Tune's final status, Tune error, cut short by the search's end, expected outcome)
CASES = {
    "done": ([row(1), row(2), row(3), row(4)], "TERMINATED", False, "", COMPLETED),
    "pruned": ([row(1), row(2)], "TERMINATED", False, "", PRUNED),
    "patience": ([row(1), row(2), row(3, early_stopped=True)], "TERMINATED", False, "", EARLY_STOPPED),
    "nan": ([row(1), row(2, status="diverged", val_acc=0.0, error="non-finite loss")],
            "TERMINATED", False, "", DIVERGED),
    # out of memory in its last planned epoch: not completed
    "oom": ([row(1), row(2), row(3), row(4, status="oom", val_acc=0.0, error="out of memory")],
            "TERMINATED", False, "", OOM),
    "crash": ([row(1)], "ERROR", True, "", ERRORED),
    "ctrl_c": ([row(1), row(2)], "TERMINATED", False, INTERRUPTED, INTERRUPTED),
    "budget": ([row(1)], "TERMINATED", False, OUT_OF_BUDGET, OUT_OF_BUDGET),
}


def test_the_rule():
    for name, (rows, _status, errored, cut, expected) in CASES.items():
        last = next((r for r in rows if r["status"] != "ok"), rows[-1])
        assert outcome(TrialView(CONFIG, last, errored, ended_by_search=cut)) == expected, name
    assert outcome(TrialView(CONFIG, row(2), live="RUNNING")) == RUNNING
    assert outcome(TrialView(CONFIG, {}, live="PENDING")) == PENDING
    assert outcome(TrialView(CONFIG, {})) == NOT_STARTED
    # a crash Tune recovered from, then ran to the end, is completed; early stop in stage 1 is not the end
    assert outcome(TrialView(CONFIG, row(4), errored=True)) == COMPLETED
    assert outcome(TrialView(CONFIG, row(1, early_stopped=True))) == PRUNED


class LiveTrial:
    """The parts of ray.tune.experiment.Trial the callbacks read."""

    def __init__(self, trial_id: str, root: Path, rows: list[dict], status: str):
        self.trial_id, self.config, self.status = trial_id, dict(CONFIG), status
        self.last_result = {**rows[-1], "trial_id": trial_id}
        self.local_path = str(root / f"trial_{trial_id}")
        self.path = self.local_path  # storage = the driver's folder: nothing to upload
        self.storage = SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem())

    def init_local_path(self):
        Path(self.local_path).mkdir(parents=True, exist_ok=True)


def write_folder(exp: Path, trial_id: str, rows: list[dict], errored: bool) -> None:
    d = exp / f"trial_{trial_id}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.json").write_text(json.dumps(CONFIG))
    (d / "result.json").write_text("".join(json.dumps({**r, "trial_id": trial_id}) + "\n" for r in rows))
    if errored:
        (d / "error.txt").write_text("Traceback ...\nRuntimeError: boom\n")


def hparams_status(run_dir: str) -> tuple[str, int]:
    ea = EventAccumulator(run_dir, size_guidance={"tensors": 0})
    ea.Reload()
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    return start.session_start_info.hparams["status"].string_value, end.session_end_info.status


@pytest.mark.parametrize("search_end", [INTERRUPTED, OUT_OF_BUDGET])
def test_every_consumer_shows_the_same_outcome(tmp_path, search_end):
    """A search whose trials end every way, driven through the callbacks as Tune drives them; the
    search's end cuts one trial short (Ctrl-C, or the time budget: budget.json says it is spent)."""
    exp = tmp_path / "exp"
    exp.mkdir()
    cases = {k: v for k, v in CASES.items() if v[3] in ("", search_end)}
    live = {k: LiveTrial(k, exp, rows, "RUNNING") for k, (rows, *_rest) in cases.items()}
    trials = list(live.values())
    tb, ends = EpochTensorBoard(exp=exp), SearchLog(exp)
    for name, (rows, _status, errored, _cut, _expected) in cases.items():
        t = live[name]
        for cb in (tb, ends):
            cb.on_trial_start(iteration=0, trials=trials, trial=t)
        for r in rows:
            tb.on_trial_result(iteration=r["epoch"], trials=trials, trial=t, result={**r, "trial_id": name})
        write_folder(exp, name, rows, errored)
    if search_end == OUT_OF_BUDGET:
        (exp / "budget.json").write_text(json.dumps({"budget_s": 60, "spent_s": 60.2}))
    for name, (_rows, status, errored, cut, _expected) in cases.items():
        t = live[name]
        if cut:
            continue  # Tune calls no trial hook for trials the experiment's end stops
        for cb in (tb, ends):
            if errored:
                cb.on_trial_error(iteration=9, trials=trials, trial=t)
            else:
                cb.on_trial_complete(iteration=9, trials=trials, trial=t)
        t.status = status
    for t in trials:  # Tune's cleanup marks everything left TERMINATED before on_experiment_end
        t.status = "ERROR" if t.status == "ERROR" else "TERMINATED"
    tb.on_experiment_end(trials=trials)
    ends.on_experiment_end(trials=trials)

    expected = {k: v[4] for k, v in cases.items()}
    cut_short = read_ends(exp)
    assert cut_short == {k: search_end for k, v in cases.items() if v[3]}
    # the read side: trial folders + trial_ends.json
    on_disk = {t.trial_id: t.status for t in load_trials(exp)}
    assert on_disk == expected
    # the console's table at the end of the search
    _, rows = table_rows(trials, cut_short)
    assert {r[0]: r[1] for r in rows} == expected
    line = Progress.of(trials, total=len(trials), cut=cut_short).line(elapsed=10, parallel=1)
    # diverged, oom, errored are failed; only ASHA's cut is pruned
    assert f"| 1 pruned | 3 failed | 1 {search_end} |" in line
    # TensorBoard's HParams status, failure for the three failures; an interrupted trial gets no
    # session (its resume writes one)
    for name, want in expected.items():
        run = live[name].local_path
        if want == INTERRUPTED:
            assert "_hparams_/session_start_info" not in _hparams_tags(run)
            continue
        status, end = hparams_status(run)
        assert status == want, name
        assert (end == api_pb2.Status.STATUS_FAILURE) == (want in (DIVERGED, OOM, ERRORED)), name
    # text and report leaderboards, the plot's line style
    records = load_trials(exp)
    text = leaderboard(records)
    for name, want in expected.items():  # a ranked trial's row, or the line below the table
        assert any(line.split()[1:2] == [name] and f" {want} " in f" {line} " or
                   line.strip().startswith(f"{name}: {want}") for line in text.splitlines()), (name, text)
    report_rows = {r[1]: r[5].split(":")[0] for r in leaderboard_rows(records)}
    assert report_rows == expected
    assert STYLE[PRUNED] == "--" and END_MARKER[search_end] == ">"


def _hparams_tags(run_dir: str) -> set[str]:
    ea = EventAccumulator(run_dir, size_guidance={"tensors": 0})
    ea.Reload()
    try:
        return set(ea.PluginTagToContent("hparams"))
    except KeyError:  # no hparams data at all
        return set()


def test_a_resumed_trial_that_finishes_leaves_the_ends_file(tmp_path):
    write_ends(tmp_path, {"a": INTERRUPTED, "b": INTERRUPTED}, finished=set())
    write_ends(tmp_path, {}, finished={"a"})  # the resumed search ran "a" to its end
    assert read_ends(tmp_path) == {"b": INTERRUPTED}
    (tmp_path / ENDS_FILE).write_text("{not json")
    assert read_ends(tmp_path) == {}


def test_a_trial_folder_without_params_is_listed(tmp_path):
    """Tune made the folder, then the trial died before writing params.json."""
    (tmp_path / "trial_x1").mkdir()
    (tmp_path / "trial_x1" / "error.txt").write_text("RuntimeError: worker died\n")
    (tmp_path / "trial_x2").mkdir()
    status = {t.trial_id: t.status for t in load_trials(tmp_path)}
    assert status == {"x1": ERRORED, "x2": NOT_STARTED}  # Tune's id, as every other trial shows it
    assert "x1: errored (RuntimeError: worker died)" in leaderboard(load_trials(tmp_path))


def test_a_trial_that_never_ran_is_not_started_though_tune_gave_it_a_row(tmp_path):
    """Tune's live Trial carries a bookkeeping last_result before any epoch; Ctrl-C then marks it
    TERMINATED: not pruned, not finished."""
    t = LiveTrial("idle", tmp_path, [{"trial_id": "idle", "done": False}], "TERMINATED")
    assert outcome(TrialView(CONFIG, t.last_result, live="TERMINATED")) == NOT_STARTED
    assert "[search] 0/4 trials finished | 0 running | 0 pruned" in Progress.of([t], total=4).line(0, 1)
    _, rows = table_rows([t])
    assert rows[0][1] == NOT_STARTED


def test_budget_cut_event_files_go_to_tunes_storage_filesystem(tmp_path):
    """Tune's last sync runs before on_experiment_end: the HParams session written then is copied to
    the trial's storage through Tune's own filesystem, whose paths (a bucket's too) carry no scheme."""
    from search.tensorboard import upload_events
    staging, storage = tmp_path / "staging" / "trial_a", tmp_path / "storage"
    staging.mkdir(parents=True)
    (staging / "events.out.tfevents.1.host").write_bytes(b"x")
    fs = pyarrow.fs.SubTreeFileSystem(str(storage), pyarrow.fs.LocalFileSystem())  # a "bucket" at storage/
    trial = SimpleNamespace(local_path=str(staging), path="runs/exp/trial_a",
                            storage=SimpleNamespace(storage_filesystem=fs))
    upload_events(trial)
    assert (storage / "runs/exp/trial_a/events.out.tfevents.1.host").read_bytes() == b"x"
    assert not (tmp_path / "runs").exists() and not list(Path.cwd().glob("runs/exp/trial_a"))
