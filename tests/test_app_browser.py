"""app.py in a real headless browser: pick the model, upload an image, read the predicted class.

Runs Streamlit on a free port on 127.0.0.1 and drives Debian's chromium through Playwright
(never `playwright install`: the browser is the system's). Skips when either is missing (fails instead when CI=true).
The screenshot lands in tests/_artifacts/app.png.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fake_cifar import missing
from tests.test_predict import make_tiny_model, save_png

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "_artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
START_TIMEOUT = 90  # s: Streamlit up and answering its health check


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.read().strip() == b"ok"
    except OSError:
        return False


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing(f"no chromium at {CHROMIUM}: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed: pip install playwright")
    import streamlit  # noqa: F401 - a dependency of the product: its absence is a failure
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(browser, tmp_path_factory):
    """(url, model path, image) with the app serving a freshly trained tiny model."""
    root = tmp_path_factory.mktemp("app")
    port = _free_port()
    log = open(root / "streamlit.log", "w")
    # as a user starts it: app.py becomes `streamlit run` on 127.0.0.1, headless, no usage statistics
    proc = subprocess.Popen([sys.executable, "app.py", "--root", str(root / "runs"), "--port", str(port)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        # trained while Streamlit starts: the app looks for models when the page loads, not before
        model_path, test = make_tiny_model(root)
        image = save_png(test.images[3], root / "upload.png", size=96)
        deadline = time.monotonic() + START_TIMEOUT
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"streamlit did not start:\n{(root / 'streamlit.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, model_path, image
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_upload_shows_the_same_class_as_predict(app, browser):
    import predict
    url, model_path, image = app
    expected = predict.predict_files(model_path, [str(image)], k=1)[0]["top"][0]["class"]

    page = browser.new_page(viewport={"width": 1100, "height": 2600})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_text("tiny/analysis/model.pt").first.wait_for(timeout=60_000)  # the model is listed
        page.locator('input[type="file"]').wait_for(state="attached", timeout=60_000)
        page.locator('input[type="file"]').set_input_files(str(image))
        value = page.get_by_test_id("stMetricValue").first
        value.wait_for(timeout=60_000)
        shown = value.inner_text().strip()
        page.get_by_text("Probability of each of the 100 classes").wait_for(timeout=30_000)
        page.wait_for_timeout(1000)  # let the chart finish drawing for the screenshot
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
    finally:
        page.close()
    assert shown == expected
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000
    hosts = {u.split("/")[2] for u in requests if u.startswith("http")}
    assert hosts <= {f"127.0.0.1:{url.rsplit(':', 1)[1]}"}, f"the page fetched from elsewhere: {hosts}"
