"""The analysis report: one self-contained HTML page with its plots, from a real (small) experiment."""
from __future__ import annotations

import base64
import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis.experiment import load_trials, rank
from report import write_report
from report.classes import class_results, ranked_classes, top_confusions
from report.importance import compute_importance
from report.schedule import compute_schedule, steps_per_epoch
from trainable.config import TrialConfig
from trainable.stages import plan_stages

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ["val_acc_curves.png", "lr_schedule.png", "class_accuracy.png"]


@pytest.fixture(scope="module")
def experiment(e2e_analyzed) -> Path:
    """A real search and its analysis through the CLIs: the one test_e2e.py runs (conftest.py)."""
    exp, proc = e2e_analyzed
    assert "report: " in proc.stdout
    return exp


@pytest.fixture(scope="module")
def page(experiment) -> str:
    return (experiment / "analysis" / "report.html").read_text(encoding="utf-8")


def test_report_is_one_self_contained_file(experiment, page):
    assert page.startswith("<!DOCTYPE html>")
    links = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page, flags=re.I)
    assert links and all(u.startswith("data:image/png;base64,") for u in links), links
    assert not re.search(r"<(script|link|iframe)\b", page, flags=re.I)
    assert "http://" not in page and "https://" not in page and "url(" not in page


def test_report_embeds_its_pngs(experiment, page):
    analysis = experiment / "analysis"
    embedded = [base64.b64decode(b) for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]
    files = {p.name: p.read_bytes() for p in analysis.glob("*.png")}
    assert set(PLOTS) <= set(files)
    assert all(b.startswith(PNG) for b in embedded)
    assert sorted(embedded) == sorted(files.values())  # every PNG written is in the page, and only those
    if len(rank(load_trials(experiment))) >= 2 and "param_importance.png" not in files:
        assert "No importance plot" in page  # a note says why


def test_report_has_leaderboard_test_results_and_config(experiment, page):
    for t in load_trials(experiment):
        assert t.trial_id in page
    metrics = json.loads((experiment / "analysis" / "test_metrics.json").read_text())
    data_name = yaml.safe_load((experiment / "search_settings.yaml").read_text())["data_dir"].rsplit("/", 1)[-1]
    assert f"test accuracy on {data_name}" in page
    assert f"{metrics['test_acc']:.1%}" in page and f"{metrics['test_coarse_acc']:.1%}" in page  # one format
    assert "CIFAR-100" not in page  # the data is named for what it is
    best = yaml.safe_load((experiment / "best_config.yaml").read_text())
    assert html.escape(best["retrain_command"], quote=True) in page
    assert f"stage1_lr: {best['config']['stage1_lr']}" in page
    assert "<th>best class</th>" in page and "<th>worst class</th>" in page


def test_lr_schedule_matches_what_the_trials_reported(experiment):
    """The recomputed per-step schedule agrees with the lr each trial reported after each epoch."""
    checked = 0
    for t in load_trials(experiment):
        steps = steps_per_epoch(t)
        sch = compute_schedule(t.config, steps)
        plan = plan_stages(TrialConfig.from_dict(t.config))
        assert len(sch.head_lr) == steps * sum(s.epochs for s in plan)
        for r in t.results:
            e = int(r["epoch"])
            if any(s.first_epoch + s.epochs == e for s in plan):
                continue  # the stage's last step: its lr is the next stage's business
            assert sch.head_lr[e * steps] == pytest.approx(r["lr"], rel=1e-6)
            checked += 1
    assert checked > 0


def test_report_without_retrain_or_enough_trials(experiment, tmp_path):
    """One trial, no retrain: the page still renders, with notes instead of what it can't show."""
    exp = tmp_path / "one"
    shutil.copytree(experiment, exp, ignore=shutil.ignore_patterns("analysis", "checkpoint_*"))
    for t in load_trials(exp)[1:]:
        shutil.rmtree(t.path)
    (exp / "optuna.db").unlink(missing_ok=True)  # the study would still hold the removed trials
    page = write_report(exp).read_text()
    assert "importance needs at least 10" in page
    assert "No retrain yet" in page
    assert (exp / "analysis" / "val_acc_curves.png").exists()


def test_class_results_and_confusions():
    names = ["a", "b", "c", "d"]
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3])
    preds = np.array([0, 0, 0, 1, 2, 2, 2, 2, 3, 0])
    r = class_results(preds, labels, names)
    assert r.accuracy.tolist() == [0.75, 0.0, 1.0, 0.5]
    best, worst = ranked_classes(r, k=2)
    assert [names[i] for i in best] == ["c", "a"] and [names[i] for i in worst] == ["b", "d"]
    assert top_confusions(r, k=3) == [(1, 2, 2), (3, 0, 1), (0, 1, 1)]


def test_importance_over_the_real_trials(experiment):
    imp = compute_importance(load_trials(experiment), experiment)
    if imp.values:
        assert abs(sum(imp.values.values()) - 1) < 1e-6
        assert imp.evaluator == "fANOVA"
    else:
        assert imp.note
