"""Resource planning and how the local Ray is started (ray.init itself is replaced here)."""
from __future__ import annotations

import types

import pytest

from search.resources import plan_resources, start_ray
from planning.settings import SearchSettings, parse_settings
from trainable.errors import UserError


def test_defaults_follow_the_gpu_count():
    assert plan_resources(SearchSettings(gpus=4)).trial == {"cpu": 2, "gpu": 1.0}
    assert plan_resources(SearchSettings(gpus=0)).trial == {"cpu": 1, "gpu": 0.0}
    assert plan_resources(SearchSettings(), gpus_visible=2).gpus == 2  # default: all visible
    half = plan_resources(SearchSettings(gpus=2, gpus_per_trial=0.5, cpus_per_trial=1))
    assert half.trial == {"cpu": 1, "gpu": 0.5} and half.gpus == 2  # two trials share a GPU


@pytest.mark.parametrize("kw", [{"gpus": 1, "gpus_per_trial": 2}, {"gpus": 0, "cpus_per_trial": 10_000}])
def test_more_than_there_is_is_a_user_error(kw):
    with pytest.raises(UserError):
        plan_resources(SearchSettings(**kw))


@pytest.mark.parametrize("argv", [["--gpus", "-1"], ["--gpus-per-trial", "0"], ["--cpus-per-trial", "0"]])
def test_impossible_numbers_are_user_errors(argv):
    with pytest.raises(UserError):
        parse_settings(argv)


@pytest.fixture
def fake_ray(monkeypatch):
    import ray
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or types.SimpleNamespace(
        dashboard_url=f"{kw['dashboard_host']}:{kw['dashboard_port']}"))
    return calls


def test_dashboard_local_by_default_with_token_hint(fake_ray, capsys):
    s = SearchSettings(gpus=2, dashboard_port=0)
    start_ray(s, plan_resources(s))
    out = capsys.readouterr().out
    assert fake_ray[0]["dashboard_host"] == "127.0.0.1" and fake_ray[0]["num_gpus"] == 2
    assert fake_ray[0]["address"] == "local"  # never joins a stray cluster by accident
    assert "warning" not in out and "ray get-auth-token" in out


def test_dashboard_elsewhere_warns(fake_ray, capsys):
    s = SearchSettings(gpus=0, dashboard_host="0.0.0.0", dashboard_port=0)
    start_ray(s, plan_resources(s))
    out = capsys.readouterr().out
    assert fake_ray[0]["dashboard_host"] == "0.0.0.0"
    assert "warning: the Ray dashboard listens on 0.0.0.0" in out and "submit code" in out
