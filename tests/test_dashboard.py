"""While a search runs, its Ray dashboard lists the search's job and trial actors, behind a token."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import REPO
from tests.test_faults import QUICK, free_port


def _get(url: str, token: str | None) -> tuple[int, object]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except urllib.error.URLError:  # not listening (yet, or any more)
        return 0, None


def test_dashboard_lists_job_and_trials_with_token(tmp_path, data_dir):
    port = free_port()
    args = ["--space", "tiny", "--num-samples", 4, "--scheduler", "fifo", "--max-epochs", 4,
            "--set", "input_size=64", "--subset", 20, "--dashboard-port", port, "--data-dir", data_dir,
            "--storage-path", tmp_path, "--name", "dash", *QUICK[2:]]  # a longer run than QUICK's subset
    driver = subprocess.Popen([sys.executable, "-u", "run_search.py", *map(str, args)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        lines = []
        for line in driver.stdout:  # the CLI prints the dashboard URL and how to log in
            lines.append(line)
            if "Ray dashboard:" in line:
                break
        assert any(f"127.0.0.1:{port}" in ln and "ray get-auth-token" in ln for ln in lines), lines
        token = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token"],
                               capture_output=True, text=True, check=True).stdout.strip()
        assert token
        status, listening_by = 0, time.time() + 180  # the CLI prints the URL as Ray starts its dashboard (slow under load)
        while status == 0 and time.time() < listening_by:
            status, _ = _get(f"{base}/api/v0/actors", None)
            time.sleep(0 if status else 1)
        assert status in (401, 403), f"dashboard answered {status} without a token"
        trial_actors, jobs = [], []
        deadline = time.time() + 180
        while time.time() < deadline and not (trial_actors and jobs):
            time.sleep(1)
            status, body = _get(f"{base}/api/v0/actors?limit=1000", token)
            if status != 200:  # the state API answers 500 for a moment while Ray starts up
                continue
            trial_actors = [a for a in body["data"]["result"]["result"]
                            if a["class_name"].endswith("ImplicitFunc")]  # Tune's function trainable
            status, body = _get(f"{base}/api/jobs/", token)
            if status == 200:
                jobs = [j for j in body if j.get("type") == "DRIVER" and j.get("status") == "RUNNING"]
        assert trial_actors, "no trial actor listed"
        assert jobs and "run_search.py" in jobs[0].get("entrypoint", ""), jobs
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
