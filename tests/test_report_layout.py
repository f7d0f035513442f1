"""The report reads without fighting it: no legend over a bar's label, no sideways scrolling for the
leaderboard or the reproduce command (in a real browser), one format for accuracies."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from analysis.experiment import export_best, load_trials
from report import classes, importance
from report.build import write_report
from report.classes import class_results
from report.importance import Importance
from tests.test_app_browser import browser  # noqa: F401 - the fixture: Debian's chromium via Playwright
from tests.test_importance import _experiment


def _captured(monkeypatch, module) -> list:
    figs: list = []
    monkeypatch.setattr(module, "save", lambda fig, path: figs.append(fig) or path)
    return figs


def _overlaps(fig) -> list[str]:
    """Bar labels (and other texts in the axes) a legend of the figure covers, after drawing."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    hit = []
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            for text in ax.texts:
                if text.get_text() and box.overlaps(text.get_window_extent(renderer)):
                    hit.append(text.get_text())
    return hit


def test_no_legend_covers_a_bar_label(monkeypatch):
    """The worst case for "10 best classes": every bar near 100 %, so every label sits at the right."""
    rng = np.random.default_rng(0)
    names = [f"class_{i}" for i in range(100)]
    labels = np.repeat(np.arange(100), 50)
    preds = np.where(rng.random(labels.size) < 0.97, labels, rng.integers(0, 100, labels.size))
    res = class_results(preds, labels, names)
    figs = _captured(monkeypatch, classes)
    classes.plot_classes(res, Path("classes.png"))
    classes.plot_confusions(res, Path("confusions.png"))
    imp_figs = _captured(monkeypatch, importance)
    values = {f"param_{i}": v for i, v in enumerate([0.22, 0.21, 0.2, 0.19, 0.18])}  # long bars, long labels
    importance.plot_importance(Importance("fANOVA", values, "", study=type("S", (), {"trials": [0] * 12})()),
                               Path("imp.png"))
    assert len(figs) == 2 and len(imp_figs) == 1
    for fig in figs + imp_figs:
        assert fig.legends, "each figure keeps its legend"
        assert _overlaps(fig) == []


@pytest.fixture(scope="module")
def long_report(tmp_path_factory) -> Path:
    """A report whose cells and command are as long as they get: a deep experiment path (the
    reproduce command has no space to break at), an explicit augment list, a failure's reason."""
    root = tmp_path_factory.mktemp("r") / ("deeply_nested_folder_" * 6).rstrip("_")
    root.mkdir(parents=True)
    exp = _experiment(root, n_trials=10)
    trials = load_trials(exp)
    cfg = json.loads((trials[0].path / "params.json").read_text())
    cfg["augment"] = "flip,translate=0.125,rotate=15,zoom=0.2,perspective=0.2,jitter=0.4,grayscale=0.1,blur=0.1,erase=0.25"
    (trials[0].path / "params.json").write_text(json.dumps(cfg))
    (trials[1].path / "error.txt").write_text("RuntimeError: " + "a_very_long_reason_without_spaces_" * 5 + "\n")
    export_best(exp, load_trials(exp))
    return write_report(exp)


def test_accuracies_in_one_format(long_report):
    page = long_report.read_text()
    summary = re.search(r"<h2>Summary</h2>(.*?)</section>", page, flags=re.S).group(1)
    assert re.search(r"\d+\.\d%", summary)  # best val_acc as a percentage with one decimal
    assert not re.search(r"\b0\.\d{3,}", summary)  # never a fraction beside it


def test_leaderboard_and_command_need_no_sideways_scrolling(long_report, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    try:
        page.goto(long_report.as_uri())
        wide = page.evaluate("""() => {
            const out = [];
            const root = document.documentElement;
            if (root.scrollWidth > root.clientWidth) out.push(`page ${root.scrollWidth} > ${root.clientWidth}`);
            for (const el of document.querySelectorAll('table, pre')) {
                const box = el.getBoundingClientRect();
                if (box.right > root.clientWidth + 1 || el.scrollWidth > el.clientWidth + 1)
                    out.push(`${el.tagName} ${Math.round(box.right)} / ${el.scrollWidth} > ${el.clientWidth}`);
            }
            return out;
        }""")
        assert "analyze.py" in page.inner_text("pre")  # the reproduce command is on the page
    finally:
        page.close()
    assert wide == []
