"""A write that fails (a full disk, a quota, a read-only folder): every file is the new complete one
or the old one, no temporary is left, files that describe each other stay a set, and the CLI says
in one line which path failed and how much space it needs (exit 2)."""
from __future__ import annotations

import builtins
import os
import errno
import json
from pathlib import Path

import pytest
import yaml

import analyze
from analysis.experiment import SETTINGS_FILE
from tests.fake_cifar import write_fake_cifar
from trainable import atomic
from trainable.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

# trains in seconds: timm's 0.36 M-parameter test network, 32 px, one epoch per stage
TINY = {"backbone": "test_efficientnet", "pretrained": False, "input_size": 32, "batch_size": 50,
        "aug_strength": 0.0, "eval_batch_size": 200, "stage1_epochs": 1, "stage2_epochs": 1,
        "unfreeze_depth": 1}


def tiny_experiment(root: Path, config: dict | None = None) -> Path:
    """A finished one-trial search on fake data, written as Tune writes it (no Ray needed)."""
    data = write_fake_cifar(root / "data", train_per_class=3, test_per_class=1)
    exp = root / "exp"
    trial = exp / "trial_0"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps(config or TINY))
    rows = [{"trial_id": "t0", "epoch": e, "stage": e, "val_acc": 0.1 * e, "val_loss": 4.0, "best_val_acc": 0.1 * e,
             "best_epoch": e, "lr": 0.01, "train_loss": 4.0, "images_per_sec": 100.0, "train_seconds": 1.0,
             "status": "ok", "training_iteration": e} for e in (1, 2)]
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (exp / SETTINGS_FILE).write_text(yaml.safe_dump({"data_dir": str(data), "subset": None, "seed": 0,
                                                     "val_fraction": 0.25, "space": "tiny"}))
    return exp


class _FullDisk:
    """open() whose files named like `target` take `allowed` bytes, then raise `err` (ENOSPC) mid-write."""

    def __init__(self, monkeypatch, target: str, allowed: int = 1000, err: int = errno.ENOSPC):
        real_open = builtins.open
        self.hits: list[str] = []

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if "w" in mode and target in Path(str(file)).name:
                self.hits.append(str(file))
                real_write = f.write
                _left = [allowed]  # bytes this file may still take before the disk is "full"

                def write(data):
                    if len(data) > _left[0]:
                        real_write(bytes(data)[:_left[0]])
                        raise OSError(err, os.strerror(err))
                    _left[0] -= len(data)
                    return real_write(data)
                f.write = write
            return f
        monkeypatch.setattr(builtins, "open", fake_open)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_analyze_with_a_full_disk_keeps_the_old_model_and_metrics(tmp_path, monkeypatch, capsys):
    """The issue's case: the disk fills while model.pt is written. One error line naming model.pt and
    the space it needs, exit 2, no temporary left, and model.pt, test_predictions.pt and
    test_metrics.json are still the earlier retrain's set (not new metrics for an unsaved model)."""
    exp = tiny_experiment(tmp_path)
    assert analyze.main([str(exp)]) == 0
    out = exp / "analysis"
    before = _files(out)
    assert {"model.pt", "test_metrics.json", "test_predictions.pt"} <= set(before)
    capsys.readouterr()

    disk = _FullDisk(monkeypatch, "model.pt")
    assert analyze.main([str(exp), "--full-schedule"]) == 2
    assert disk.hits, "model.pt was never written"
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write "), err
    assert str(out / "model.pt") in lines[0] and "no space left" in lines[0] and "MB" in lines[0]
    assert _files(out) == before  # the old set, untouched; no temporary beside it
    assert not [p for p in exp.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("target", ["test_metrics.json", "test_predictions.pt"])
def test_a_failure_on_any_file_of_the_set_keeps_the_whole_old_set(tmp_path, monkeypatch, target):
    import torch

    from analysis.final import retrain_and_test
    from trainable.data import prepare_final_data
    exp = tiny_experiment(tmp_path)
    data = prepare_final_data(exp.parent / "data", subset=None, seed=0, download=False)
    out = tmp_path / "out"
    retrain_and_test(TINY, data, out)
    before = _files(out)
    _FullDisk(monkeypatch, target, allowed=10, err=errno.EDQUOT)
    with pytest.raises(UserError, match="disk quota exceeded"):
        retrain_and_test({**TINY, "seed": 1}, data, out)
    assert _files(out) == before
    torch.load(out / "model.pt", weights_only=True)  # still loads


# ----------------------------------------------------------------------------- the helpers


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "disk quota exceeded"),
                                         (errno.EACCES, "check that its folder exists and is writable")])
def test_write_text_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch, code, words):
    path = tmp_path / "best_config.json"
    path.write_text("old")
    _FullDisk(monkeypatch, path.name, allowed=3, err=code)
    with pytest.raises(UserError) as e:
        atomic.write_text(path, "new contents, longer than the disk allows")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and words in msg
    if code != errno.EACCES:
        assert "needs" in msg and "kB" in msg
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_new_file_that_fails_leaves_nothing(tmp_path, monkeypatch):
    _FullDisk(monkeypatch, "model.pt", allowed=0)
    with pytest.raises(UserError, match="no space left"):
        atomic.torch_save({"w": [1, 2, 3]}, tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_together_renames_only_when_every_file_is_written(tmp_path, monkeypatch):
    a, b = tmp_path / "a.bin", tmp_path / "b.json"
    atomic.write_bytes(a, b"old a")
    atomic.write_text(b, "old b")
    with pytest.raises(RuntimeError):
        with atomic.together() as files:
            files.write_bytes(a, b"new a")
            raise RuntimeError("the next file could not be built")
    assert a.read_bytes() == b"old a" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json"]
    with atomic.together() as files:
        files.write_bytes(a, b"new a")
        files.write_text(b, "new b")
    assert (a.read_bytes(), b.read_text()) == (b"new a", "new b")


def test_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="No such file or directory"):
        atomic.write_text(tmp_path / "gone" / "x.json", "{}")


def test_every_writer_goes_through_atomic():
    """No product module writes a file by itself (open(..., 'w'), write_text, torch.save, savefig to a
    path, json/yaml dump to a file): new writers must use trainable/atomic.py."""
    import re
    repo = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"""open\([^)]*,\s*["'][wax]b?["']|(?<!atomic)(?<!files)\.write_(text|bytes)\(|"""
                         r"""torch\.save\(|savefig\((?!buf)|json\.dump\(|yaml\.(safe_)?dump\([^)]*,\s*\w+\)""")
    prose = re.compile(r""""[^"]{4,}"|'[^']{4,}'""")  # messages that show a user how to save
    allowed = {"trainable/atomic.py",  # the helpers themselves
               "trainable/trial.py",  # Tune's checkpoint, written into a private temporary folder
               "search/run.py",  # the --storage-path write probe
               "analysis/cloud.py",  # a fetched file, written as .part and renamed (cleaned on failure)
               "benchmarks/common.py"}  # a benchmark's running log, appended as it goes
    offenders = []
    for path in repo.glob("**/*.py"):
        rel = path.relative_to(repo).as_posix()
        if rel.startswith((".venv/", "tests/")) or rel in allowed:
            continue
        offenders += [f"{rel}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                      if pattern.search(prose.sub('""', line))]
    assert not offenders, offenders
