"""Where an experiment may be stored on a cluster: the decision, without a real cluster."""
from __future__ import annotations

import pytest

from analysis.cloud import check_uri, is_uri
from planning.settings import SearchSettings, parse_settings
from search.storage import check_cluster_storage, open_experiment
from trainable.errors import UserError


def node(ip: str, alive: bool = True) -> dict:
    return {"NodeManagerAddress": ip, "Alive": alive, "NodeID": f"id-{ip}-{alive}"}


ONE_MACHINE = [node("10.0.0.1"), node("10.0.0.1"), node("10.0.0.1")]  # e.g. ray.cluster_utils
TWO_MACHINES = [node("10.0.0.1"), node("10.0.0.2")]


@pytest.mark.parametrize("path", ["./runs", "/tmp/runs", "~/runs", "file:///tmp/runs"])
def test_local_folder_on_several_machines_is_refused_with_the_fix(path):
    with pytest.raises(UserError) as e:
        check_cluster_storage(path, TWO_MACHINES, shared=False)
    msg = str(e.value)
    assert "\n" not in msg and "2 machines" in msg and "--storage-shared" in msg


@pytest.mark.parametrize("nodes", [[], [node("10.0.0.1")], ONE_MACHINE,
                                   [node("10.0.0.1"), node("10.0.0.2", alive=False)]])
def test_one_machine_needs_nothing_shared(nodes):
    assert check_cluster_storage("./runs", nodes, shared=False) is None


def test_the_flag_says_the_folder_is_shared():
    note = check_cluster_storage("/mnt/nfs/runs", TWO_MACHINES, shared=True)
    assert note and "/mnt/nfs/runs" in note and "\n" not in note


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://b/x", "GS://b", "hdfs://nn/runs", "abfs://c@a/x"])
def test_uris_are_uris_and_need_no_shared_folder(uri):
    assert is_uri(uri)
    assert check_cluster_storage(uri, TWO_MACHINES, shared=False) is None
    assert check_uri(uri).startswith(uri.split("://")[0].lower() + "://")


@pytest.mark.parametrize("path", ["./runs", "/abs", "file:///tmp/x", "runs", "C:\\runs"])
def test_local_paths_are_not_uris(path):
    assert not is_uri(path)


@pytest.mark.parametrize("uri", ["ftp://host/x", "http://h/x", "s3://", "gs:///"])
def test_bad_uris_are_user_errors(uri):
    with pytest.raises(UserError):
        check_uri(uri)


def test_cloud_storage_is_reached_before_anything_else():  # the rest: tests/test_cloud_storage.py
    uri = "s3://bucket/runs?endpoint=127.0.0.1:9"  # not an option pyarrow knows: it says so at once
    with pytest.raises(UserError) as e:
        open_experiment(uri, "x", "", resume=False)
    assert "s3://bucket/runs/x?endpoint=127.0.0.1:9" in str(e.value) and "\n" not in str(e.value)


def test_the_flag_is_a_cli_switch():
    assert parse_settings(["--storage-shared"]).storage_shared is True
    assert parse_settings([]).storage_shared is False


def test_start_ray_refuses_before_any_trial(monkeypatch):
    import ray

    from search.resources import plan_resources, start_ray
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append("init"))
    monkeypatch.setattr(ray, "nodes", lambda: TWO_MACHINES)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    s = SearchSettings(gpus=0, address="10.0.0.1:6379")
    with pytest.raises(UserError):
        start_ray(s, plan_resources(s))
    assert calls == ["init", "shutdown"]
    calls.clear()
    s = SearchSettings(gpus=0, address="10.0.0.1:6379", storage_shared=True)
    start_ray(s, plan_resources(s))
    assert calls == ["init"]
