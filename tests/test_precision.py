"""Precision: the choice per GPU generation (capability queries faked), the overrides, and the
autocast paths run for real on the CPU: bf16 (the GPU's own code path: autocast, channels_last,
no loss scaling) and fp16 with a GradScaler, through run_trial and a search from the CLI."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.fake_cifar import random_split
from trainable import trial
from trainable.config import TrialConfig
from trainable.errors import UserError
from trainable.loop import Precision, choose_precision
from trainable.trial import CHECKPOINT_FILE, run_trial

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
BASE = {"backbone": "resnet18", "pretrained": False, "input_size": 32, "batch_size": 50, "aug_strength": 0.0,
        "eval_batch_size": 200, "stage1_epochs": 1, "stage2_epochs": 1}


@pytest.fixture
def gpu(monkeypatch):
    """A fake CUDA GPU of a given compute capability; is_bf16_supported says yes (as it does for
    emulated bf16) to show the choice does not listen to it."""
    def make(capability: tuple[int, int], name: str = "Fake GPU"):
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return make


@pytest.mark.parametrize("capability, name, expected", [
    ((7, 0), "Tesla V100", "fp16"), ((7, 5), "Tesla T4", "fp16"), ((6, 1), "GTX 1080", "fp16"),
    ((8, 0), "A100", "bf16"), ((8, 6), "RTX 3090", "bf16"), ((8, 9), "L4", "bf16"),
    ((9, 0), "H100", "bf16"), ((12, 0), "a future GPU", "bf16"),
])
def test_auto_picks_bf16_only_where_the_gpu_has_it_natively(gpu, capability, name, expected):
    gpu(capability, name)
    assert choose_precision(CUDA, "auto") == expected
    prec = Precision.for_device(CUDA, "resnet18")
    assert prec.name == expected and prec.channels_last
    with warnings.catch_warnings():  # GradScaler("cuda") on a machine without CUDA warns and disables itself
        warnings.simplefilter("ignore")
        scaler = prec.grad_scaler()
    assert (scaler is not None) == (expected == "fp16")  # loss scaling for fp16 only


def test_auto_is_fp32_on_the_cpu():
    assert choose_precision(CPU) == "fp32"
    prec = Precision.for_device(CPU, "resnet18")
    assert prec.amp_dtype is None and prec.grad_scaler() is None and prec.channels_last


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("requested, dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_an_explicit_precision_wins_on_any_device(gpu, device, requested, dtype):
    gpu((9, 0))
    assert choose_precision(device, requested) == requested
    assert Precision.for_device(device, "resnet18", requested).amp_dtype == dtype


def test_forcing_bf16_on_a_gpu_that_only_emulates_it_warns(gpu):
    gpu((7, 5), "Tesla T4")
    with pytest.warns(UserWarning, match="bf16 on Tesla T4 .*7.5.* is emulated"):
        assert Precision.for_device(CUDA, "resnet18", "bf16").amp_dtype == torch.bfloat16


def test_an_unknown_precision_is_a_user_error():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        choose_precision(CPU, "fp8")
    with pytest.raises(UserError, match="precision must be one of auto, fp32, bf16, fp16"):
        TrialConfig.from_dict({"precision": "fp8"})
    assert TrialConfig().precision == "auto"


# --- the autocast paths, run for real on the CPU -----------------------------------------------------

@pytest.fixture(scope="module")
def splits():
    return random_split(100, 0), random_split(40, 1)



@pytest.fixture
def spy(monkeypatch):
    """What run_trial handed the training loop, and the dtypes the model computed in."""
    seen: dict = {"prec": [], "scaler": [], "out_dtypes": set(), "input_channels_last": set()}
    real_epoch, real_model = trial.train_epoch, trial.create_model
    monkeypatch.setenv("CIFAR_TUNE_FEATURE_CACHE", "off")  # a cached head-only stage calls neither train_epoch nor evaluate

    def train_epoch(*a, **k):
        seen["prec"].append(k["prec"])
        seen["scaler"].append(k["scaler"])
        return real_epoch(*a, **k)

    def create_model(*a, **k):
        net = real_model(*a, **k)

        def hook(_m, inputs, out):
            seen["input_channels_last"].add(inputs[0].is_contiguous(memory_format=torch.channels_last))
            seen["out_dtypes"].add((out[0] if isinstance(out, tuple) else out).dtype)
        net.register_forward_hook(hook)
        return net
    monkeypatch.setattr(trial, "train_epoch", train_epoch)
    monkeypatch.setattr(trial, "create_model", create_model)
    return seen


def test_bf16_trains_on_the_cpu_through_the_gpu_code_path(splits, spy):
    rows: list[dict] = []
    _, last = run_trial({**BASE, "precision": "bf16"}, *splits, lambda m, c: rows.append(m), checkpoint=False)
    assert [r["status"] for r in rows] == ["ok", "ok"] and last["status"] == "ok"
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in rows)
    assert all(p.device.type == "cpu" and p.amp_dtype == torch.bfloat16 and p.channels_last for p in spy["prec"])
    assert spy["scaler"] == [None, None]  # bf16 bypasses loss scaling
    assert spy["out_dtypes"] == {torch.bfloat16}  # the model really ran under autocast (train and eval)
    assert spy["input_channels_last"] == {True}


def test_fp16_with_a_grad_scaler_trains_saves_and_resumes_its_scale(splits, spy, tmp_path):
    ckpts: list[Path] = []

    def report(m, ckpt):
        if ckpt is not None:  # the directory only lives during the call
            ckpts.append(Path(shutil.copytree(ckpt, tmp_path / f"epoch{m['epoch']}")))
    _, last = run_trial({**BASE, "precision": "fp16"}, *splits, report, stop_after_epoch=1)
    assert last["status"] == "ok" and np.isfinite(last["train_loss"])
    scaler = spy["scaler"][0]
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() and scaler.get_scale() > 0
    assert spy["out_dtypes"] == {torch.float16}
    saved = torch.load(ckpts[0] / CHECKPOINT_FILE, weights_only=True)["scaler"]
    assert saved["scale"] == scaler.get_scale() and saved["_growth_tracker"] > 0
    # stage 2 (several param groups, per-block lrs) resumes with the scale the checkpoint learned
    _, last = run_trial({**BASE, "precision": "fp16"}, *splits, lambda m, c: None, restore=ckpts[0],
                        checkpoint=False)
    resumed = spy["scaler"][1]
    assert last["status"] == "ok" and last["epoch"] == 2 and resumed is not scaler
    assert resumed.state_dict()["_growth_tracker"] > saved["_growth_tracker"]  # continued, not restarted


def test_fp32_trains_without_autocast(splits, spy):
    run_trial({**BASE, "stage2_epochs": 0, "precision": "fp32"}, *splits, lambda m, c: None, checkpoint=False)
    assert spy["out_dtypes"] == {torch.float32} and spy["scaler"] == [None]


def test_a_search_runs_bf16_on_the_cpu_and_exports_it(tmp_path, data_dir):
    proc = run_cli("run_search.py", "--precision", "bf16", "--space", "tiny", "--num-samples", 1,
                   "--scheduler", "fifo", "--max-epochs", 2, "--warm-start", "none", "--subset", 5,
                   "--backbones", "tf_efficientnet_lite0", "--gpus", 0, "--no-pretrained",
                   "--set", "input_size=32", "--data-dir", data_dir, "--storage-path", tmp_path,
                   "--name", "bf16", timeout=300, check=True)
    exp = tmp_path / "bf16"
    [params] = list(exp.glob("trial_*/params.json"))
    assert json.loads(params.read_text())["precision"] == "bf16"
    results = [json.loads(line) for line in next(exp.glob("trial_*/result.json")).read_text().splitlines()]
    assert [r["status"] for r in results] == ["ok", "ok"]
    best = json.loads((exp / "best_config.json").read_text())
    assert best["config"]["precision"] == "bf16" and "best: trial" in proc.stdout


def test_a_bad_precision_flag_is_one_line_before_ray_starts(tmp_path, data_dir):
    proc = run_cli("run_search.py", "--precision", "fp8", "--space", "tiny", "--gpus", 0, "--no-pretrained",
                   "--data-dir", data_dir, "--storage-path", tmp_path, "--name", "bad", timeout=120)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()  # refused by the option check, before anything starts
    assert line.startswith("error: argument --precision: invalid choice: 'fp8'") and "'bf16'" in line
    assert not (tmp_path / "bad").exists()
