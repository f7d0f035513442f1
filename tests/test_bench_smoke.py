"""Smoke test of benchmarks/: every measurement's code path runs on tiny sizes (no timing is
asserted; the benchmark's numbers live in BENCHMARKS.md), plus the one functional check the
benchmark makes: stage 1 trains the head and nothing else."""
from __future__ import annotations

from benchmarks.markdown import replace_block

import os

import numpy as np
import pytest
import torch

from benchmarks import bench, layout, micro, searches
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


def test_bare_loop_alternates_thread_counts(split):
    torch.manual_seed(0)
    b = micro.make_bench(split, weights_dir="", channels_last=False)
    assert not b.prec.channels_last
    rows = micro.bare_epochs(b, epochs=2, input_size=32, batch_size=8, val=split, warmup_steps=1,
                             thread_counts=(1, 2))
    assert [r["threads"] for r in rows] == [1, 2, 1, 2]


def test_ceiling_takes_the_faster_thread_count():
    bare = [{"threads": 1, "images": 100, "train_seconds": 1.0, "eval_seconds": 0.25},
            {"threads": 2, "images": 100, "train_seconds": 0.5, "eval_seconds": 0.9},
            {"threads": 1, "images": 100, "train_seconds": 1.0, "eval_seconds": 0.25}]
    c = bench.ceiling_rates(bare, (1, 2))
    assert c["threads"] == 1 and c["whole"] == pytest.approx(80.0) and c["train"] == pytest.approx(100.0)
    assert c["per_threads"][2]["whole"] == pytest.approx(100 / 1.4)  # faster train, slower whole
    bare[1]["eval_seconds"] = 0.1
    assert bench.ceiling_rates(bare, (1, 2))["threads"] == 2


def test_trial_rates_split_training_from_the_rest():
    rows = [{"images_per_sec": 100.0, "train_seconds": 2.0, "time_this_iter_s": 2.5}] * 2
    t = bench.trial_rates(rows)
    assert t["train"] == pytest.approx(100.0) and t["whole"] == pytest.approx(80.0)
    assert t["other_s"] == pytest.approx(0.5) and t["images_per_epoch"] == pytest.approx(200.0)


def test_layout_measure_runs():
    rows = layout.measure("resnet18", 32, batch=2, thread_counts=(1,), rounds=1, call_seconds=0.01)
    assert {(r["mode"], r["layout"]) for r in rows} == {(m, lay) for m in layout.MODES for lay in layout.LAYOUTS}
    assert all(r["rate"] > 0 and r["images"] >= 2 and r["threads"] == 1 for r in rows)
    assert torch.get_num_threads() >= 1


def _rows(spec: str, train: float, fwd: float) -> list[dict]:
    """Synthetic layout rows: contiguous at 100 img/s, channels_last at ratio x that."""
    return [{"backbone": spec, "size": 32, "mode": m, "threads": t, "layout": lay,
             "rate": 100.0 * (r if lay == "channels_last" else 1.0)}
            for m, r in (("train", train), ("forward", fwd)) for t in (1, 2) for lay in layout.LAYOUTS]


def test_layout_verdicts_pick_contiguous_where_it_trains_faster():
    rows = _rows("tf_efficientnet_lite0", 2.0, 1.5) + _rows("vgg13_bn:small", 0.8, 1.2) + _rows("resnet18", 1.02, 0.9)
    v = layout.verdicts(rows)
    assert v["tf_efficientnet_lite0"]["winner"] == "channels_last" and v["tf_efficientnet_lite0"]["train"] == pytest.approx(2.0)
    assert v["vgg13_bn:small"]["winner"] == "contiguous"  # training decides, not the forward pass
    assert v["resnet18"]["winner"] == "channels_last" and v["resnet18"]["within_noise"]
    assert layout.cpu_contiguous(v) == frozenset({"vgg13_bn"})
    text = layout.table(rows) + layout.summary(v)
    assert "| tf_efficientnet_lite0 | 32 px | train | 1 | channels_last | 200 | 2.00 |" in text
    assert "frozenset({'vgg13_bn'})" in text


def test_layout_spec_and_block(tmp_path):
    assert layout.parse_spec("vgg13_bn:small") == ("vgg13_bn", True)
    assert layout.parse_spec("resnet18") == ("resnet18", False)
    with pytest.raises(ValueError):
        layout.parse_spec("resnet18:big")
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(f"# B\n{bench.BEGIN}\nbench\n{bench.END}\nhand-written\n")
    replace_block(out, f"{layout.BEGIN}\nfirst\n{layout.END}")
    replace_block(out, f"{layout.BEGIN}\nsecond\n{layout.END}")
    text = out.read_text()
    assert "second" in text and "first" not in text and "hand-written" in text and "bench" in text
    assert text.count(layout.BEGIN) == 1


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


def test_same_configs_searcher_samples_at_random(monkeypatch, tmp_path):
    import optuna

    from benchmarks import _search_entry
    from search.searcher import make_searcher
    from spaces import Options, get_space
    monkeypatch.setattr(optuna.samplers, "TPESampler", optuna.samplers.TPESampler)  # undone after
    _search_entry._same_configs(12)
    searcher = make_searcher(get_space("tiny"), Options(("tf_efficientnet_lite0",), 4), {}, {}, 0,
                             exp=tmp_path)
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
    replace_block(out, bench.markdown(rep, info))
    out.write_text(out.read_text() + "\n## Analysis\nhand-written\n")
    replace_block(out, bench.markdown(rep, info).replace("detail", "new detail"))
    text = out.read_text()
    assert "hand-written" in text and "new detail" in text and text.count(bench.BEGIN) == 1
    assert "| 1 | x | 1 img/s |" in text


def test_quick_scale_is_consistent():
    for sc in (bench.QUICK, bench.FULL):
        train_images = sc.overhead_subset * 100 * 9 // 10
        assert sc.dl_batches * sc.batch <= train_images  # the DataLoader baseline's images exist
        assert set(sc.headroom_rounds) == set(sc.sizes)
        assert set(sc.bare_epochs_each_side) == set(sc.overhead_sizes)
    assert bench.FULL.overhead_sizes == (32, 128)  # the two sizes
