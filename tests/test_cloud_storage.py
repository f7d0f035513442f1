"""A cloud --storage-path against a real S3 API, offline: moto's S3 server on 127.0.0.1, reached by
pyarrow (and so by Ray Tune) through the URI's own options (?endpoint_override=...&scheme=http)."""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pyarrow.fs
import pytest

from analysis.cloud import (
    check_reachable,
    check_uri,
    download,
    driver_files,
    join,
    kind,
    mirror_dir,
    redact,
    split_query,
    upload,
)
from tests.conftest import run_cli
from trainable.errors import UserError

BUCKET = "cifar-tune-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server with one bucket; yields its URI options ('?endpoint_override=...')."""
    from moto.server import ThreadedMotoServer

    before = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = f"?endpoint_override={host}:{port}&scheme=http"
    fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://{BUCKET}{opts}&allow_bucket_creation=true")
    fs.create_dir(BUCKET)
    yield opts
    server.stop()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def bucket_files(uri: str) -> dict[str, int]:
    """{relative path: size} of every file under `uri`."""
    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root):].lstrip("/"): i.size for i in infos if i.type == pyarrow.fs.FileType.File}


# --- URIs: the name goes before pyarrow's options, as Ray Tune splits them -----------------------

OPTS = "?endpoint_override=127.0.0.1:9000&scheme=http"


@pytest.mark.parametrize("storage", [f"s3://b/runs{OPTS}", f"s3://b/runs/{OPTS}", f"S3://b/runs{OPTS}"])
def test_join_puts_the_name_before_the_options(storage):
    uri = join(check_uri(storage), "exp")
    assert uri == f"s3://b/runs/exp{OPTS}"
    from ray.air._internal.uri_utils import (
        URI,  # how Tuner.restore splits an experiment URI
    )
    assert URI(uri).name == "exp" and str(URI(uri).parent) == f"s3://b/runs{OPTS}"
    from analysis.cloud import parent_and_name
    assert parent_and_name(uri) == (f"s3://b/runs{OPTS}", "exp")


def test_pyarrow_and_ray_read_the_options():
    from ray.train._internal.storage import get_fs_and_path
    fs, path = get_fs_and_path(join(f"s3://b/runs{OPTS}", "exp"))
    assert isinstance(fs, pyarrow.fs.S3FileSystem) and path == "b/runs/exp"
    assert split_query(f"gs://b/x{OPTS}") == ("gs://b/x", OPTS)


def test_secrets_in_the_options_are_not_printed():
    shown = redact("s3://b/runs?secret_key=hunter2&access_key=AKIA&endpoint_override=h:1")
    assert "hunter2" not in shown and "AKIA" not in shown and "endpoint_override=h:1" in shown


@pytest.mark.parametrize("uri", ["ftp://host/x", "s3://", f"s3://{OPTS}"])
def test_bad_uris_name_a_cloud_example(uri):
    with pytest.raises(UserError) as e:
        check_uri(uri)
    assert "s3://BUCKET/runs" in str(e.value) and "\n" not in str(e.value)


def test_the_local_copy_is_one_folder_per_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_TUNE_CACHE", str(tmp_path))
    assert mirror_dir(f"s3://b/runs/exp{OPTS}") == tmp_path / "runs/s3/b/runs/exp"
    assert mirror_dir("gs://b/runs/exp") == tmp_path / "runs/gs/b/runs/exp"
    assert mirror_dir(f"s3://b/runs/exp{OPTS}", str(tmp_path / "mine")) == tmp_path / "mine/exp"


# --- reaching the URI: one line naming it and the fix, exit 2, before Ray starts ------------------

def test_a_missing_bucket_is_one_line(s3):
    with pytest.raises(UserError) as e:
        check_reachable(f"s3://no-such-bucket/runs{s3}")
    msg = str(e.value)
    assert "\n" not in msg and "s3://no-such-bucket/runs" in msg and "bucket" in msg and "credentials" in msg


def test_a_server_that_is_not_there_is_one_line():
    with pytest.raises(UserError) as e:
        check_reachable("s3://b/runs?endpoint_override=127.0.0.1:9&scheme=http")
    assert "\n" not in str(e.value) and "cannot be reached" in str(e.value)


def test_bad_options_say_to_fix_the_uri():
    with pytest.raises(UserError) as e:
        check_reachable("s3://b/runs?endpoint=127.0.0.1:9")
    assert "?options" in str(e.value)


def test_a_storage_that_does_not_answer_is_given_up_on(monkeypatch):
    class Hanging:  # as pyarrow's GCS client without credentials or network: retries for minutes
        @staticmethod
        def from_uri(uri):
            time.sleep(30)
    monkeypatch.setattr(pyarrow.fs, "FileSystem", Hanging)
    monkeypatch.setattr("analysis.cloud.PROBE_TIMEOUT_S", 0.5)
    t = time.monotonic()
    with pytest.raises(UserError) as e:
        check_reachable("gs://b/runs")
    assert time.monotonic() - t < 5
    assert "did not answer" in str(e.value) and "gcloud" in str(e.value)


def test_analyze_of_an_empty_uri_is_one_line(s3, tmp_path):
    proc = run_cli("analyze.py", f"s3://{BUCKET}/runs/nothing{s3}", timeout=120, env={"CIFAR_TUNE_CACHE": str(tmp_path)})
    assert proc.returncode == 2 and "holds no experiment" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_the_cli_stops_before_ray_with_exit_2(s3, tmp_path):
    proc = run_cli("run_search.py", "--space", "tiny", "--gpus", "0", "--storage-path", f"s3://no-such-bucket/runs{s3}",
                   "--name", "x", timeout=120, env={"CIFAR_TUNE_CACHE": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://no-such-bucket/runs" in lines[0], proc.stderr
    assert "Ray dashboard" not in proc.stdout


def test_no_credentials_is_one_line_exit_2(s3, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"))
    import subprocess
    import sys

    from tests.conftest import REPO
    proc = subprocess.run([sys.executable, "run_search.py", "--space", "tiny", "--gpus", "0", "--storage-path",
                           f"s3://{BUCKET}/runs{s3}", "--name", "x"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "AWS_ACCESS_KEY_ID" in proc.stderr


# --- moving files: the driver's own, the trials' results, never the checkpoints -------------------

@pytest.mark.parametrize("rel, expected", [("optuna.db", "driver"), ("tuner.pkl", "ray"), ("experiment_state-1.json", "ray"),
                                           ("trial_a/result.json", "trial"), ("trial_a/x.lock", "trial"),
                                           ("trial_a/checkpoint_000001/state.pt", "checkpoint")])
def test_each_file_of_an_experiment_has_a_kind(rel, expected):
    assert kind(rel) == expected


def test_upload_and_download_round_trip(s3, tmp_path):
    uri = f"s3://{BUCKET}/unit/exp{s3}"
    local = tmp_path / "exp"
    (local / "trial_a" / "checkpoint_000001").mkdir(parents=True)
    (local / "trial_a" / "checkpoint_000001" / "state.pt").write_bytes(b"x" * 100)
    (local / "trial_a" / "result.json").write_text('{"val_acc": 0.5}\n')
    (local / "search_settings.yaml").write_text("seed: 0\n")
    (local / "tuner.pkl").write_bytes(b"ray's")
    (local / "experiment_state-2026.json").write_text("{}")
    db = sqlite3.connect(local / "optuna.db")
    db.execute("create table t (x)")
    db.execute("insert into t values (1)")
    db.commit()
    db.execute("begin")
    db.execute("insert into t values (2)")  # a transaction still open: the upload is the committed state
    assert [f.name for f in driver_files(local)] == ["optuna.db", "search_settings.yaml"]
    upload(driver_files(local), local, uri)
    upload([local / "trial_a" / "result.json", local / "trial_a" / "checkpoint_000001" / "state.pt",
            local / "tuner.pkl"], local, uri)
    db.rollback()
    db.close()
    assert set(bucket_files(uri)) == {"optuna.db", "search_settings.yaml", "trial_a/result.json",
                                      "trial_a/checkpoint_000001/state.pt", "tuner.pkl"}

    fresh = tmp_path / "fresh"
    got = download(uri, fresh, ("driver", "trial"))
    assert sorted(got) == ["optuna.db", "search_settings.yaml", "trial_a/result.json"]
    assert sqlite3.connect(fresh / "optuna.db").execute("select x from t").fetchall() == [(1,)]
    assert download(uri, fresh, ("driver", "ray", "trial")) == ["tuner.pkl"]  # the rest is current
    (fresh / "search_settings.yaml").write_text("seed: 1\n")  # newer here: kept
    os.utime(fresh / "search_settings.yaml", (time.time() + 60, time.time() + 60))
    assert download(uri, fresh, ("driver", "ray", "trial")) == []
    assert (fresh / "search_settings.yaml").read_text() == "seed: 1\n"
    assert download(f"s3://{BUCKET}/unit/nothing-here{s3}", tmp_path / "none", ("driver",)) == []


# --- the whole job through the CLIs: search into the bucket, analyze it, resume it elsewhere ------

SEARCH = ["--subset", 5, "--backbones", "tf_efficientnet_lite0", "--gpus", 0, "--no-pretrained", "--space", "tiny",
          "--set", "input_size=64", "--grace-period", 1, "--num-samples", 2, "--max-concurrent", 1,
          "--max-epochs", 2, "--scheduler", "fifo"]


def trial_results(uri: str) -> dict[str, int]:
    """{trial folder: epochs reported} in the bucket."""
    import json
    fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    out = {}
    for rel in bucket_files(uri):
        if rel.endswith("/result.json"):
            with fs.open_input_stream(f"{root}/{rel}") as f:
                out[rel.split("/")[0]] = len([ln for ln in f.read().decode().splitlines() if json.loads(ln)])
    return out


def bucket_study(uri: str, tmp: Path) -> list[tuple[int, str]]:
    """(number, state) of each trial of the bucket's optuna.db."""
    download(uri, tmp, ("optuna.db",))
    return sqlite3.connect(tmp / "optuna.db").execute("select number, state from trials order by number").fetchall()


@pytest.fixture(scope="module")
def cloud_search(s3, tmp_path_factory, data_dir):
    """Two trials one after the other into the bucket, Ctrl-C once the second has started (a user
    stopping the search): the resume test finishes it from the bucket alone."""
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO
    cache = tmp_path_factory.mktemp("driver")
    storage = f"s3://{BUCKET}/runs{s3}"
    uri = join(storage, "cloud")
    driver = subprocess.Popen([sys.executable, "run_search.py", *map(str, SEARCH), "--data-dir", str(data_dir),
                               "--storage-path", storage, "--name", "cloud"], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "CIFAR_TUNE_CACHE": str(cache)})
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None and len(trial_results(uri)) < 2:
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode in (0, 130), out[-3000:]
    return storage, uri, cache / "runs/s3" / BUCKET / "runs/cloud", out


def test_the_search_writes_trials_and_driver_files_to_the_bucket(cloud_search):
    _, uri, local, proc = cloud_search
    files = bucket_files(uri)
    trial = next(p.split("/")[0] for p in files if p.endswith("/result.json"))
    assert {f"{trial}/result.json", f"{trial}/params.json"} <= set(files)  # written by Ray Tune
    assert any(p.startswith(f"{trial}/checkpoint_") for p in files)
    assert {"optuna.db", "search_settings.yaml", "best_config.yaml", "best_config.json",
            "estimate.json"} <= set(files)  # the driver's, uploaded
    assert any(p.startswith("experiment_state-") for p in files)  # Ray's own state, for --resume
    assert (local / "optuna.db").is_file() and (local / trial / "result.json").is_file()
    assert not any(local.glob("*/checkpoint_*"))  # checkpoints stay in the bucket
    assert "python analyze.py" in proc and "s3://" in proc


def test_the_bucket_study_knows_every_trial_ray_started(cloud_search, tmp_path):
    _, uri, _, _ = cloud_search
    assert len(bucket_study(uri, tmp_path)) == len(trial_results(uri)) == 2


def test_ctrl_c_prints_our_resume_command_not_rays(cloud_search):
    """Ray's `Resume experiment with: Tuner.restore(...)` would contradict the CLI's --resume line."""
    from tests.printed import check_command, printed_after
    storage, _, _, out = cloud_search
    assert "Tuner.restore" not in out and "Resume experiment with" not in out
    argv = check_command(printed_after(out, "interrupted: continue it with "))
    assert argv[2:] == ["--resume", "--name", "cloud", "--storage-path", storage]
    assert check_command(printed_after(out, "uploaded to ").split("analysis/ goes to the bucket too): ", 1)[1])


def test_analyze_reads_the_uri_and_uploads_its_analysis(cloud_search, tmp_path):
    _, uri, _, _ = cloud_search
    out = run_cli("analyze.py", uri, "--no-retrain", check=True, timeout=300,
                  env={"CIFAR_TUNE_CACHE": str(tmp_path)})  # another machine: nothing local yet
    here = tmp_path / "runs/s3" / BUCKET / "runs/cloud"
    assert (here / "analysis" / "report.html").is_file()
    assert "analysis/report.html" in bucket_files(uri)
    assert str(here / "analysis") in out.stdout and "s3://" in out.stdout.splitlines()[-1]


def test_resume_from_the_uri_with_the_local_copy_gone(cloud_search, tmp_path):
    import shutil
    storage, uri, local, _ = cloud_search
    settings = (local / "search_settings.yaml").read_text()
    shutil.rmtree(local)
    out = run_cli("run_search.py", "--resume", "--name", "cloud", "--storage-path", storage, check=True,
                  env={"CIFAR_TUNE_CACHE": str(local.parents[3] / "elsewhere")})
    assert "fetched" in out.stdout
    # back where the search began (Ray's saved searcher opens optuna.db there), not in the new cache
    assert (local / "search_settings.yaml").read_text() == settings and (local / "optuna.db").is_file()
    assert "best: trial" in out.stdout
    assert list(trial_results(uri).values()) == [2, 2]  # the interrupted trial went on to its end
    assert bucket_study(uri, tmp_path) == [(0, "COMPLETE"), (1, "COMPLETE")]


def test_the_callback_uploads_when_the_study_changes_and_keeps_rays_copies_current(s3, tmp_path):
    from types import SimpleNamespace

    from search.progress import SearchLog
    from search.storage import Place

    def in_bucket() -> str:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        with fs.open_input_stream(f"{root}/budget.json") as f:
            return f.read().decode()
    exp, staging = tmp_path / "exp", tmp_path / "staging"
    exp.mkdir()
    staging.mkdir()
    (exp / "budget.json").write_text("9")
    (staging / "budget.json").write_text("1")  # what Ray fetched when it restored, and uploads with its state
    uri = f"s3://{BUCKET}/callback/exp{s3}"
    cb = SearchLog(exp, sync=Place(exp, uri, every_s=3600).sync)
    trial = SimpleNamespace(trial_id="a", storage=SimpleNamespace(experiment_driver_staging_path=str(staging)))
    cb.on_trial_result(0, [], trial, {})  # the first result uploads
    assert in_bucket() == "9" and (staging / "budget.json").read_text() == "9"
    (exp / "budget.json").write_text("10")
    cb.on_trial_result(0, [], trial, {})  # then once every every_s
    assert in_bucket() == "9"
    cb.on_trial_start(0, [], trial)  # a new trial: the study changed
    assert in_bucket() == "10" and (staging / "budget.json").read_text() == "10"
    assert not (staging / "optuna.db").exists()  # only Ray's own copies are refreshed
