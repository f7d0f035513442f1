"""benchmarks/: the in-process measurements run on tiny sizes through the product's own functions
(no timing is asserted: the numbers live in BENCHMARKS.md), the one functional check the benchmark
makes (stage 1 trains the head and nothing else), and the pure arithmetic behind its ratios."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks import bench, layout
from trainable.data import Split


@pytest.fixture(scope="module")
def ctx():
    rng = np.random.default_rng(0)
    n = 24
    split = Split(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 100, n).astype(np.int64),
                  rng.integers(0, 20, n).astype(np.int64))
    a = SimpleNamespace(**{**bench.QUICK, "sizes": (32, 48), "batch": 4, "pipe_batches": 2, "dl_batches": 2,
                           "stage_input": 32, "stage_batch": 4, "call_s": 0.0, "ceiling_s": 0.0, "overhead_batch": 8},
                        threads=1, seed=0, weights_dir="", data_dir="d", work_dir="/tmp/unused")
    before = torch.get_num_threads()
    torch.manual_seed(0)
    c = bench.Context(a)
    c.data = SimpleNamespace(train=split, val=split)  # random init and images: the same speed
    yield c
    torch.set_num_threads(before)


def test_headroom_and_stage_cost_run_and_stage_one_stops_at_the_head(ctx):
    bench.section_headroom(ctx)
    bench.section_stages(ctx)
    rows = {r[1]: r for r in ctx.rows}
    assert [r[1] for r in ctx.rows[:2]] == [f"Pipeline headroom at {s} px: augmentation+mixup / model train step"
                                            for s in (32, 48)]
    check = rows["  stage 1 backward stops at the head (backbone params with a gradient; BN stats)"]
    n = sum(1 for _ in ctx.bench.net.backbone.parameters())
    assert check[2:] == [f"0 of {n}; fixed", "—", "—", "0; fixed", "yes"]


def test_dataloader_baseline_and_pipeline_make_the_batches(ctx):
    b = ctx.bench
    assert bench.pipeline_fn(b, 48, 4, 2)() == 8
    run = bench.dataloader_fn(ctx.data.train, 48, 4, 2, 0, b.mean, b.std, b.dev)
    assert run() == 8
    x, y = bench.PILSet(ctx.data.train, lambda im: np.asarray(im))[0]
    assert x.shape == (32, 32, 3) and isinstance(y, int)


def test_ceiling_times_every_thread_count(ctx):
    c = bench.ceiling(ctx, 32, (1,))
    assert set(c) == {1} and all(s > 0 for s in c[1])


def test_ceiling_rates_average_the_runs_and_count_evaluation():
    runs = [{1: (2.0, 0.5), 2: (1.0, 1.0)}, {1: (2.0, 0.5), 2: (1.0, 0.0)}]
    r = bench.ceiling_rates(runs, 100)
    assert r[1] == pytest.approx({"train": 50.0, "whole": 40.0, "eval_s": 0.5})
    assert r[2]["whole"] == pytest.approx(100 / 1.5) and r[2]["train"] == pytest.approx(100.0)


def test_trial_rates_split_training_from_the_rest():
    rows = [{"images_per_sec": 100.0, "train_seconds": 2.0, "time_this_iter_s": 2.5}] * 2
    t = bench.trial_rates(rows)
    assert t["train"] == pytest.approx(100.0) and t["whole"] == pytest.approx(80.0)
    assert t["other_s"] == pytest.approx(0.5)


def test_search_flags_are_run_search_flags(ctx):
    from benchmarks.common import flags
    from planning.settings import parse_settings
    s = parse_settings(flags({"input_size": 16}, **ctx.search_opts(num_samples=2, cpus_per_trial=1, subset=5, max_epochs=2,
                                                                   max_concurrent=2, scheduler="asha", sampler="random")))
    assert (s.num_samples, s.max_concurrent, s.scheduler, s.subset, s.no_pretrained) == (2, 2, "asha", 5, True)
    assert (s.sampler, s.warm_start, s.space, s.set) == ("random", "none", "tiny", ["input_size=16"])


def test_flags_leave_out_none_and_false():
    from benchmarks.common import flags
    assert flags({"a": 1}, num_samples=4, subset=None, no_pretrained=True, quick=False, gpus=0) == \
        ["--num-samples", "4", "--no-pretrained", "--gpus", "0", "--set", "a=1"]


def test_tree_memory_reads_this_process_and_waits_for_trial_workers():
    m = bench.TreeMemory(timebox=0.0, workers=1)
    assert m(SimpleNamespace(pid=os.getpid())) is False  # no trial worker yet: the search goes on
    assert m.pss > 0 and m.rss >= m.uss > 0 and m.samples == 1 and m.max_workers == 0


def test_scales_are_consistent():
    for sc in (bench.QUICK, bench.FULL):
        assert sc["dl_batches"] * sc["batch"] <= sc["subset"] * 100 * 9 // 10  # the DataLoader's images exist
    assert bench.FULL["overhead_sizes"] == (32, 128)


def test_layout_measure_times_every_contender():
    rows = layout.measure("resnet18", 32, batch=2, thread_counts=(1,), rounds=1, call_seconds=0.0)
    assert sorted((r["mode"], r["layout"]) for r in rows) == sorted((m, x) for m in layout.MODES for x in layout.LAYOUTS)


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


def test_layout_spec():
    assert layout.parse_spec("vgg13_bn:small") == ("vgg13_bn", True)
    assert layout.parse_spec("resnet18") == ("resnet18", False)
    with pytest.raises(ValueError):
        layout.parse_spec("resnet18:big")


def test_rungs_correlates_each_rung_with_the_last_epoch():
    from benchmarks.rungs import correlations
    acc = [(0.1, 0.3, 0.5), (0.2, 0.1, 0.2), (0.3, 0.4, 0.6), (0.4, 0.2, 0.1)]
    trials = [SimpleNamespace(results=[{"epoch": e + 1, "val_acc": a} for e, a in enumerate(t)]) for t in acc]
    trials.append(SimpleNamespace(results=[{"epoch": 1, "val_acc": 0.9}]))  # pruned at 1: not in the pairs
    corr = correlations(trials, [1, 2], last=3)
    assert corr[1] == (pytest.approx(-0.4), 4) and corr[2] == (pytest.approx(0.8), 4)


def test_rungs_refuses_options_an_experiment_brings_itself(capsys):
    from benchmarks import rungs
    assert rungs.main(["--experiment", "/nonexistent", "--max-epochs", "5", "--subset", "3"]) == 2
    assert "--max-epochs, --subset: --experiment measures" in capsys.readouterr().err


def test_benchmarks_print_the_command_as_typed(monkeypatch):
    from analysis.command import PROJECT, python
    from benchmarks.common import Invocation
    monkeypatch.chdir(PROJECT)
    assert Invocation("duel.py", ["--budget", "965s", "--work-dir", "/tmp/a b"]).command == \
        f"{python()} benchmarks/duel.py --budget 965s --work-dir '/tmp/a b'"


def test_duel_and_headroom_resume_from_their_json_and_print_their_tables(tmp_path):
    """A re-run reads what the last one saved: duel.json {seed: {contender: result}}, headroom {seed:label: result}."""
    from benchmarks import duel, headroom
    from benchmarks.common import Invocation, Results
    assert duel.contenders("a@1,c@0.5") == [("d", 1.0), ("a", 1.0), ("c", 0.5)]
    one = {"wall_s": 100.0, "trials": 7, "epochs": 21, "best_val_acc": 0.4, "winner": "recipe x", "curve": [[10.0, 0.4]],
           "test_acc": 0.4, "retrain_s": 9.0, "budget_s": None}
    saved = Results(tmp_path / "duel.json")
    saved["0"] = {"d": one, "a@1": {**one, "curve": [[5.0, 0.3], [50.0, 0.45]], "test_acc": 0.42, "budget_s": 100.0}}
    saved.save()
    a = duel.parse(["--work-dir", str(tmp_path), "--seeds", "0", "--contenders", "a@1"])
    text = duel.markdown(a, Invocation("duel.py", []), Results(tmp_path / "duel.json"), [0], duel.contenders(a.contenders))
    assert "| (a) the search as users run it, 1x | 1 | 42.0 | 42.0 | +2.0 | 100 s | 7.0 | 21.0 | 50 s | recipe x |" in text
    base = {"stage1_lr": 1e-3, "input_size": 224, "stage1_epochs": 3, "stage2_epochs": 0}
    cands = headroom.neighbours(base)
    res = {"0:" + cands[0][0]: {"status": "ok", "val_acc": 0.5, "test_acc": 0.48, "train_s": 10.0},
           "0:" + cands[1][0]: {"status": "ok", "val_acc": 0.52, "test_acc": 0.5, "train_s": 5.0}}
    args = headroom.parse([])
    shown = {**base, **dict.fromkeys(headroom.SHOWN, "x")}
    table = headroom.markdown(args, Invocation("headroom.py", []), shown, cands, res, [0])
    assert "| 1 | head lr x3 | 52.0 | 50.0 | +2.0 | 50.0 | 5 s |" in table and "| 2 | head lr /3 | - | - | - | - | - |" in table


def test_duel_passes_a_gpu_users_data_weights_and_space_to_every_contender(tmp_path):
    """The proof on real CIFAR-100 with GPUs: `--gpus 4 --space default --subset 0 --weights-dir ''` reach
    run_search.py as they are (all images, hub weights, run_search.py's CPUs per trial), and a folder that
    is not the stand-in is named by its folder, never labelled CIFAR-100 or stand-in."""
    from benchmarks import duel
    a = duel.parse(["--work-dir", str(tmp_path), "--gpus", "4", "--space", "default", "--subset", "0",
                    "--weights-dir", "", "--backbones", "", "--data-dir", str(tmp_path / "cifar")])
    exp = tmp_path / "runs" / "s0-a_1"
    args = duel.cli_args("a", 600.0, a, 0, exp)
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--gpus"] == "4" and pairs["--space"] == "default" and pairs["--time-budget"] == "600s"
    assert not {"--subset", "--weights-dir", "--backbones", "--cpus-per-trial"} & set(args)
    assert a.data_label == "data: cifar"
    cpu = duel.parse(["--work-dir", str(tmp_path)])
    pairs = dict(zip(*[iter(duel.cli_args("d", None, cpu, 0, exp))] * 2))
    assert pairs["--gpus"] == "0" and pairs["--space"] == "cpu" and pairs["--cpus-per-trial"] == "1"
    assert pairs["--scheduler"] == "fifo" and cpu.data_label == "stand-in data, not CIFAR-100"
    every = duel.parse(["--work-dir", str(tmp_path), "--backbones", ""])  # '' = all the space's, as run_search.py reads it
    assert duel.recipe_count(every, 0) > duel.recipe_count(cpu, 0) > 0


@pytest.mark.parametrize("name", ["invert", "bgr"])
def test_shift_writes_the_same_images_shifted_and_the_loader_reads_them(tmp_path, name):
    from benchmarks import shift
    from tests.fake_cifar import write_fake_cifar
    from trainable.data import load_cifar100
    src = write_fake_cifar(tmp_path / "src", train_per_class=2, test_per_class=1)
    assert shift.main([str(src), str(tmp_path / "out"), "--shift", name]) == 0
    a, b = (load_cifar100(d, splits=("train", "test"), download=False) for d in (src, tmp_path / "out"))
    for before, after in ((a.train, b.train), (a.test, b.test)):
        assert (after.fine == before.fine).all() and (after.coarse == before.coarse).all()
        want = 255 - before.images if name == "invert" else before.images[:, ::-1]
        assert (after.images == want).all() and not (after.images == before.images).all()


def test_the_duel_names_the_winner_analyze_tested_not_todays_rank(tmp_path):
    """The fourteenth session: a later export rule preferred another trial, and --table-only named it beside the
    test accuracy of the one analyze.py had tested."""
    import json

    from benchmarks import duel
    base = {"backbone": "tf_efficientnet_lite0", "stage1_epochs": 3, "stage2_epochs": 0, "stage3_epochs": 0,
            "optimizer": "adamw"}
    for tid, size, acc in (("a", 96, 0.5), ("b", 224, 0.4)):
        d = tmp_path / f"trial_{tid}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps({**base, "input_size": size}))
        (d / "result.json").write_text(json.dumps({"trial_id": tid, "epoch": 3, "val_acc": acc, "status": "ok"}) + "\n")
    assert duel.winner(tmp_path).startswith("lite0 96 px")  # no export: the best by rank
    (tmp_path / "best_config.json").write_text(json.dumps({"trial_id": "b"}))
    assert duel.winner(tmp_path).startswith("lite0 224 px")
