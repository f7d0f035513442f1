"""Smoke test of benchmarks/: every measurement's code path runs on tiny sizes (no timing is
asserted; the benchmark's numbers live in BENCHMARKS.md), plus the one functional check the
benchmark makes: stage 1 trains the head and nothing else."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from benchmarks import bench, micro, searches
from trainable.data import Split


@pytest.fixture(scope="module")
def split() -> Split:
    rng = np.random.default_rng(0)
    n = 24
    return Split(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                 rng.integers(0, 100, n).astype(np.int64), rng.integers(0, 20, n).astype(np.int64))


@pytest.fixture(scope="module")
def b(split):
    torch.manual_seed(0)
    return micro.make_bench(split, weights_dir="")  # random init: same speed, no weights needed


def test_headroom_runs(b):
    r = micro.headroom(b, 32, bs=4, rounds=1, pipe_batches=2)
    assert r["pipeline"]["images"] == 8 and r["model"]["images"] == 4
    assert r["ratio"] > 0


def test_dataloader_baseline_runs(b, split):
    r = micro.vs_dataloader(b, split, 48, bs=4, rounds=1, batches=2, workers=0)
    assert r["dataloader"]["images"] == 8 and r["ratio"] > 0


def test_torchvision_transform_output(split):
    t = micro.torchvision_transform(48, (0.5,) * 3, (0.5,) * 3)
    ds = micro._PILSet(split.images, split.fine, t)
    x, y = ds[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and isinstance(y, int)


def test_bare_loop_runs(b, split):
    rows = micro.bare_epochs(b, epochs=1, input_size=32, batch_size=8, val=split, warmup_steps=1)
    assert len(rows) == 1 and rows[0]["images"] == 24
    assert rows[0]["train_seconds"] > 0 and rows[0]["eval_seconds"] > 0


def test_stage_one_stops_at_the_head(b):
    r = micro.stage_cost(b, 32, bs=4, rounds=1, steps=1)
    assert r["stage1_backbone_params_with_grad"] == 0
    assert r["stage1_head_params_with_grad"] > 0
    assert not r["stage1_bn_stats_moved"]
    assert set(r["step_ms"]) == set(r["names"]) and all(v > 0 for v in r["step_ms"].values())


def test_tree_sampler_reads_this_process():
    s = searches.TreeSampler(os.getpid())
    s.sample()
    assert s.peak.pss > 0 and s.peak.rss >= s.peak.uss > 0 and s.peak.samples == 1


def test_search_args_are_run_search_flags(tmp_path):
    from search.settings import parse_settings
    args = searches.search_args(data_dir="d", weights_dir="", storage=tmp_path, name="n", samples=2,
                                concurrent=2, cpus_per_trial=1, scheduler="fifo", seed=0, subset=5,
                                max_epochs=2, sets={"input_size": 16}, gpus=0)
    s = parse_settings(args)
    assert (s.num_samples, s.max_concurrent, s.scheduler, s.subset, s.no_pretrained) == (2, 2, "fifo", 5, True)
    assert s.set == ["input_size=16"]


def test_same_configs_searcher_samples_at_random(monkeypatch):
    import optuna

    from benchmarks import _search_entry
    from search.searcher import make_searcher
    from spaces import Options, get_space
    monkeypatch.setattr(optuna.samplers, "TPESampler", optuna.samplers.TPESampler)  # undone after
    _search_entry._same_configs(12)
    searcher = make_searcher(get_space("tiny"), Options(("tf_efficientnet_lite0",), 4), {}, {}, 0)
    assert searcher._sampler._n_startup_trials == 12


def test_markdown_keeps_hand_written_text(tmp_path):
    rep = bench.Report()
    rep.add("1", "x", "1 img/s", "2 img/s", "0.5", "≥ 0.95", "**NO**")
    rep.note("1", "detail")
    info = {"command": "python benchmarks/bench.py --quick", "date": "today", "minutes": 1.0,
            "machine": {"cpu": "cpu", "cores": 2, "gpu": "none", "ram_gib": 1.0, "python": "3",
                        "torch": "t", "torchvision": "tv", "timm": "ti", "ray": "r"},
            "load_start": 0.0, "load_end": 0.0, "data_dir": "d", "weights_dir": "", "quick": True,
            "sections": ["1"]}
    out = tmp_path / "BENCHMARKS.md"
    bench.write_markdown(out, bench.markdown(rep, info))
    out.write_text(out.read_text() + "\n## Analysis\nhand-written\n")
    bench.write_markdown(out, bench.markdown(rep, info).replace("detail", "new detail"))
    text = out.read_text()
    assert "hand-written" in text and "new detail" in text and text.count(bench.BEGIN) == 1
    assert "| 1 | x | 1 img/s |" in text


def test_quick_scale_is_consistent():
    for sc in (bench.QUICK, bench.FULL):
        train_images = sc.overhead_subset * 100 * 9 // 10
        assert sc.dl_batches * sc.batch <= train_images  # the DataLoader baseline's images exist
        assert set(sc.headroom_rounds) == set(sc.sizes)
