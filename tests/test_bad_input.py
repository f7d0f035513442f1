"""Every input a user can get wrong: one line naming the problem and the fix, exit 2, no traceback,
and no Ray cluster started."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import analyze
import run_search
from tests.conftest import REPO, run_cli
from tests.fake_cifar import write_fake_cifar, write_pickle

OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
MARKER = "/tmp/cifar_tune_pwned"


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {MARKER}",))


def _train_file(root: Path) -> Path:
    return root / "cifar-100-python" / "train"


def _rewrite_train(root: Path, **changes) -> None:
    path = _train_file(root)
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    d.update(changes)
    write_pickle(path, d, "numpy._core")


def _corrupt(kind: str, root: Path) -> None:
    path = _train_file(root)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x00not a pickle at all" * 10)
    elif kind == "evil":
        path.write_bytes(pickle.dumps(_Evil(), protocol=2))
    elif kind == "shape":
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        _rewrite_train(root, data=d["data"][:, :1000])
    elif kind == "dtype":
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        _rewrite_train(root, data=d["data"].astype(np.float32))
    elif kind == "labels":
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        _rewrite_train(root, fine_labels=[150] + list(d["fine_labels"][1:]))


def _experiment_without_results(root: Path) -> Path:
    exp = root / "exp"
    (exp / "trial_x").mkdir(parents=True)
    (exp / "search_settings.yaml").write_text("space: tiny\n")
    (exp / "trial_x" / "params.json").write_text(json.dumps({"backbone": "resnet18"}))
    (exp / "trial_x" / "result.json").write_text("")
    return exp


# (id, how to set up the case -> CLI args, words the message must contain)
CASES = [
    ("missing-data", lambda t, d: ["--data-dir", t / "nowhere"], ["not found", "--data-dir"]),
    ("truncated-pickle", "truncated", ["train", "truncated"]),
    ("corrupt-pickle", "garbage", ["train"]),
    ("code-in-pickle", "evil", ["refusing", "system"]),
    ("wrong-shape", "shape", ["train", "3072"]),
    ("wrong-dtype", "dtype", ["train", "uint8"]),
    ("labels-out-of-range", "labels", ["train", "fine"]),
    ("unknown-space", lambda t, d: ["--space", "huge"], ["unknown space", "--list-spaces"]),
    ("unknown-backbone", lambda t, d: ["--backbones", "resnet9000"], ["resnet9000", "choose from"]),
    ("unknown-set-backbone", lambda t, d: ["--set", "backbone=resnet9000"], ["unknown backbone", "timm"]),
    ("unknown-set-key", lambda t, d: ["--set", "colour=red"], ["colour", "TrialConfig"]),
    ("negative-gpus", lambda t, d: ["--gpus", "-1"], ["--gpus", "0 for CPU"]),
    ("zero-samples", lambda t, d: ["--num-samples", "0"], ["--num-samples"]),
    ("zero-gpus-per-trial", lambda t, d: ["--gpus", "2", "--gpus-per-trial", "0"], ["--gpus-per-trial", "> 0"]),
    ("too-many-gpus-per-trial", lambda t, d: ["--gpus", "2", "--gpus-per-trial", "3"], ["more than --gpus"]),
    ("too-few-epochs", lambda t, d: ["--max-epochs", "1"], ["--max-epochs", "raise it"]),
    ("missing-config", lambda t, d: ["--config", t / "none.yaml"], ["cannot read --config"]),
    ("invalid-yaml", lambda t, d: ["--config", _write(t / "bad.yaml", "a: [1, 2\n")], ["not valid YAML"]),
    ("unknown-yaml-key", lambda t, d: ["--config", _write(t / "k.yaml", "gpuz: 2\n")], ["'gpuz' is not a setting"]),
    ("resume-missing", lambda t, d: ["--resume", "--name", "nope", "--storage-path", t], ["no experiment"]),
    ("unwritable-storage", lambda t, d: ["--storage-path", _write(t / "afile", "") / "sub"], ["not writable"]),
    # configs that used to pass and then fail inside every trial (issue 11), found by sampling the space
    ("odd-batch-with-mixup", lambda t, d: ["--set", "batch_size=33", "--set", "mixup_alpha=0.2"],
     ["mixup/cutmix need an even batch_size", "use 32 or 34"]),
    ("odd-batch-sampled-mixup", lambda t, d: ["--space", "default", "--set", "batch_size=33"], ["even batch_size"]),
    ("input-too-small", lambda t, d: ["--space", "vgg13_scratch", "--set", "input_size=16"],
     ["input_size 16 is too small for vgg13_bn", "input_size >= 32"]),
    ("stage1-squeezes-stage2", lambda t, d: ["--set", "stage1_epochs=3", "--max-epochs", "4"],
     ["leaves stage 2 0 epochs", "--set stage3_epochs=0"]),
    ("stage-epochs-over-budget", lambda t, d: ["--set", "stage2_epochs=5"], ["makes a trial", "ASHA's max_t"]),
    # --seed checks its range; --set seed skipped that check and failed in the trial (numpy's generator)
    ("set-negative-seed", lambda t, d: ["--set", "seed=-1"], ["seed must be >= 0"]),
    # run fields with an option of their own: --set skipped its checks (train_fraction made every trial a screen trial)
    ("set-train-fraction", lambda t, d: ["--set", "train_fraction=0.5"], ["train_fraction is set by", "--subset"]),
    ("set-weights-dir", lambda t, d: ["--set", f"weights_dir={t / 'nowhere'}"], ["weights_dir is set by --weights-dir"]),
    ("set-precision", lambda t, d: ["--set", "precision=fp16"], ["precision is set by --precision"]),
    ("recipe-max-epochs", lambda t, d: ["--space", "mobilenetv2_2stage_128", "--max-epochs", "30"],
     ["--max-epochs 30 does not fit recipe", "20 epochs"]),
    ("weights-wrong-file", lambda t, d: ["--weights-dir", _wrong_weights(t), "--backbones", "tf_efficientnet_lite0"],
     ["does not fit", "tf_efficientnet_lite0"]),
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _wrong_weights(t: Path) -> Path:
    d = t / "weights"
    d.mkdir(exist_ok=True)
    import timm
    torch.save(timm.create_model("resnet18").state_dict(), d / "tf_efficientnet_lite0.pth")
    return d


def _setup(case, tmp_path: Path) -> tuple[list, Path]:
    """The CLI arguments of one case, its data set up (or broken) as the case says; and Ray's would-be folder."""
    name, setup, _ = case
    data = write_fake_cifar(tmp_path / "data", train_per_class=3, test_per_class=1)
    base = ["--space", "tiny", "--data-dir", data, "--storage-path", tmp_path / "runs", "--no-pretrained"]
    if isinstance(setup, str):
        _corrupt(setup, data)
        extra = []
    else:
        extra = setup(tmp_path, data)
    if "--no-pretrained" not in extra and "--weights-dir" in extra:
        base.remove("--no-pretrained")
    return [str(a) for a in (*base, *extra)], tmp_path / "ray"  # a Ray started by this run would create its session here


def _check_refused(case, tmp_path: Path, code: int, err: str, out: str, ray_tmp: Path) -> None:
    name, _, words = case
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "Traceback" not in err + out
    if name == "missing-data":  # a mistyped --data-dir: no folder (or lock file) made for it
        assert not (tmp_path / "nowhere").exists()
    for w in words:
        assert w in lines[0], lines[0]
    ray = sys.modules.get("ray")
    assert not ray_tmp.exists() and not (ray and ray.is_initialized()), "a Ray cluster was started before the input was checked"
    assert not Path(MARKER).exists()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_run_search_bad_input(case, tmp_path, monkeypatch, capsys):
    """In this process (a traceback would fail the test as it would show the user one); the one
    case below runs the CLI as a process, for its exit code and a stderr holding only the message."""
    argv, ray_tmp = _setup(case, tmp_path)
    for k, v in {**OFFLINE, "RAY_TMPDIR": str(ray_tmp)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)
    code = run_search.main(argv)
    captured = capsys.readouterr()
    _check_refused(case, tmp_path, code, captured.err, captured.out, ray_tmp)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "code-in-pickle"], ids=lambda c: c[0])
def test_run_search_bad_input_as_a_process(case, tmp_path):
    argv, ray_tmp = _setup(case, tmp_path)
    proc = run_cli("run_search.py", *argv, timeout=120, env={**OFFLINE, "RAY_TMPDIR": str(ray_tmp)})
    _check_refused(case, tmp_path, proc.returncode, proc.stderr, proc.stdout, ray_tmp)


@pytest.mark.parametrize("make", ["not-an-experiment", "no-finished-trial"])
def test_analyze_bad_input(make, tmp_path, capsys):
    target = tmp_path if make == "not-an-experiment" else _experiment_without_results(tmp_path)
    if make == "not-an-experiment":  # as a process: its exit code, and nothing on stderr but the message
        proc = run_cli("analyze.py", target, timeout=120)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = analyze.main([str(target)]), capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert ("not an experiment" if make == "not-an-experiment" else "no trial") in lines[0]
