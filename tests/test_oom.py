"""Out of memory anywhere in a trial (setup, training, validation, checkpoint) and in the final
test pass ends the same way: status oom with a reason saying what to lower (a trial), or a one-line
UserError (the final retrain). On a GPU shared by fractional trials the first OOM is retried.

The real allocator failures run in a subprocess under the product's memory budget
(trainable/memory.py), so RLIMIT_AS never touches pytest itself."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from numpy._core._exceptions import _ArrayMemoryError

from analysis import final
from search import tune_trial as search_trainable
from search.tune_trial import retry_first_oom
from tests.conftest import REPO
from tests.fake_cifar import random_split
from trainable import trial
from trainable.data import FinalData
from trainable.errors import UserError
from trainable.loop import halving_batches
from trainable.memory import is_out_of_memory
from trainable.trial import run_trial

pytestmark = pytest.mark.usefixtures("one_thread")

GIB = 1 << 30

# A CPU trial under the budget a 1-CPU node with 1.25 GiB of RAM would give (1 GiB): lite0 at 512 px,
# batch 2 trains within it; a validation batch of 64 images at 512 px does not.
CHILD = r"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from trainable.data import FinalData, Split
from trainable.errors import UserError
from trainable.memory import RAY_THRESHOLD, SHARE, limit_memory, trial_budget
from trainable.trial import run_trial

def split(n, seed):
    r = np.random.default_rng(seed)
    return Split(r.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), r.integers(0, 100, n), r.integers(0, 20, n))

what, overrides = sys.argv[1], json.loads(sys.argv[2])
cfg = {"backbone": "tf_efficientnet_lite0", "pretrained": False, "input_size": 512, "batch_size": 2,
       "eval_batch_size": 4, "aug_strength": 0.0, "stage1_epochs": 1, "stage2_epochs": 0,
       **overrides}
train, val = split(int(overrides.pop("n_train", 4)), 0), split(64, 1)
cfg.pop("n_train", None)
limit_memory(trial_budget(1, node_cpus=1, node_ram=int((1 << 30) / (RAY_THRESHOLD * SHARE))))  # a 1 GiB budget
if what == "trial":
    rows = []
    net, last = run_trial(cfg, train, val, lambda m, c: rows.append(m), checkpoint=False)
    print(json.dumps({"rows": rows, "last": last, "net": net is not None}))
else:
    from analysis.final import retrain_and_test
    data = FinalData(train, np.arange(2), np.arange(2, 4), val, [f"c{i}" for i in range(100)],
                     [f"s{i}" for i in range(20)])
    try:
        retrain_and_test(cfg, data, __import__("pathlib").Path(sys.argv[3]))
        print(json.dumps({"error": None}))
    except UserError as e:
        print(json.dumps({"error": str(e)}))
"""


# each a CHILD run: name -> (what, overrides[, output folder of a final retrain])
RUNS = {"halved": ("trial", {"eval_batch_size": 64}), "small": ("trial", {"eval_batch_size": 4}),
        "train_oom": ("trial", {"batch_size": 128, "n_train": 128}),
        "final_halved": ("final", {"eval_batch_size": 64}, "a"),
        "final_oom": ("final", {"batch_size": 128, "n_train": 128}, "b")}


@pytest.fixture(scope="module")
def children(tmp_path_factory) -> tuple[Path, dict]:
    """Every run in RUNS started at once (each on one thread): (root of their folders, name -> (code, out, err))."""
    root = tmp_path_factory.mktemp("children")
    procs = {name: subprocess.Popen([sys.executable, "-c", CHILD, what, json.dumps(overrides), *(str(root / e) for e in out)],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (what, overrides, *out) in RUNS.items()}
    try:
        outs = {name: p.communicate(timeout=600) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()  # after a timeout: none left running
    return root, {name: (procs[name].returncode, *outs[name]) for name in procs}


def _child(children, name: str) -> dict:
    code, out, err = children[1][name]
    assert code == 0, err[-3000:]  # an escaped OOM would be a traceback here
    return {**json.loads(out.strip().splitlines()[-1]), "stdout": out}


# --- real allocator failures under the budget --------------------------------------------------------

def test_a_validation_batch_over_the_budget_is_halved_until_it_fits(children):
    """64 images at 512 px in one batch do not fit the budget; halved, they do: the trial goes on
    with the numbers a small batch gives (the budget is not simply too small for anything)."""
    halved, small = _child(children, "halved"), _child(children, "small")
    assert [r["status"] for r in halved["rows"]] == [r["status"] for r in small["rows"]] == ["ok"]
    assert halved["rows"][0]["val_acc"] == small["rows"][0]["val_acc"]
    assert halved["rows"][0]["val_loss"] == pytest.approx(small["rows"][0]["val_loss"], rel=1e-5)
    assert "validation ran out of memory at eval_batch_size 64: it goes on at" in halved["stdout"]
    assert "ran out of memory" not in small["stdout"]


def test_oom_in_training_ends_the_trial_with_status_oom(children):
    [row] = _child(children, "train_oom")["rows"]
    assert row["status"] == "oom" and row["epoch"] == 1 and "train_loss" not in row
    assert "while training (batch_size 128, input_size 512): lower batch_size or input_size" in row["error"]


def test_a_final_test_batch_over_the_budget_is_halved_until_it_fits(children):
    # trains on 4 images at batch 2, then tests 64 images: one batch of 64 does not fit, halves do
    assert _child(children, "final_halved")["error"] is None
    assert json.loads((children[0] / "a" / "test_metrics.json").read_text())["test_images"] == 64


def test_oom_in_the_final_retrain_is_one_line_saying_what_to_lower(children):
    msg = _child(children, "final_oom")["error"]
    assert msg and "\n" not in msg
    assert msg.startswith("the retrain ran out of memory in epoch 1 while training (batch_size 128")
    assert "lower batch_size or input_size" in msg


# --- every phase, and CUDA's kinds of out-of-memory error (raised where the allocation fails) -------

BASE = {"backbone": "resnet18", "pretrained": False, "input_size": 32, "batch_size": 50, "aug_strength": 0.0,
        "eval_batch_size": 200, "stage1_epochs": 1, "stage2_epochs": 2}
CUDA_OOM = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.8 GiB total)")
OOM_ERRORS = [
    CUDA_OOM,
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory"),
    RuntimeError("std::bad_alloc"),
    RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"),
    MemoryError(),
    _ArrayMemoryError((1 << 40,), np.dtype("uint8")),  # what NumPy raises
]
NOT_OOM = [RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), ValueError("out of memory"),
           RuntimeError("CUDA error: device-side assert triggered")]


@pytest.fixture(scope="module")
def splits():
    return random_split(100, 0), random_split(40, 1)



@pytest.mark.parametrize("error", OOM_ERRORS, ids=lambda e: type(e).__name__ + ":" + str(e)[:20])
def test_out_of_memory_errors_are_recognised(error):
    assert is_out_of_memory(error)


@pytest.mark.parametrize("error", NOT_OOM, ids=str)
def test_other_errors_are_not_out_of_memory(error):
    assert not is_out_of_memory(error)


def _failing_at(monkeypatch, name: str, call: int, error: BaseException) -> None:
    """trial.<name> raises `error` on its `call`-th call (1-based), runs for real before."""
    real, n = getattr(trial, name), {"calls": 0}
    monkeypatch.setenv("CIFAR_TUNE_FEATURE_CACHE", "off")  # a cached head-only stage calls neither train_epoch nor evaluate

    def fake(*a, **k):
        n["calls"] += 1
        if n["calls"] == call:
            raise error
        return real(*a, **k)
    monkeypatch.setattr(trial, name, fake)


@pytest.mark.parametrize("phase, name, call, epoch, text", [
    ("validation", "evaluate", 2, 2, "in epoch 2 while validating (down to one image at a time, input_size 32)"),
    ("training", "train_epoch", 3, 3, "in epoch 3 while training (batch_size 50, input_size 32)"),
    ("setup", "create_model", 1, 1, "setting up (model resnet18 and data on cpu) before epoch 1"),
    ("setup", "to_device", 2, 1, "setting up (model resnet18 and data on cpu) before epoch 1"),
])
def test_cuda_oom_in_any_phase_ends_with_status_oom(monkeypatch, splits, phase, name, call, epoch, text):
    _failing_at(monkeypatch, name, call, CUDA_OOM)
    rows: list[dict] = []
    _, last = run_trial(BASE, *splits, lambda m, c: rows.append(m), checkpoint=False)
    assert [r["status"] for r in rows] == ["ok"] * (epoch - 1) + ["oom"]
    assert rows[-1]["epoch"] == epoch and text in rows[-1]["error"] and last["status"] == "oom"
    assert rows[-1]["val_acc"] == 0.0 and rows[-1]["best_val_acc"] == 0.0  # TPE and ASHA see a 0


def test_oom_while_saving_a_checkpoint_ends_with_status_oom(monkeypatch, splits):
    real = trial.torch.save
    monkeypatch.setattr(trial.torch, "save", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    rows: list[dict] = []
    try:
        _, last = run_trial(BASE, *splits, lambda m, c: rows.append(m))
    finally:
        monkeypatch.setattr(trial.torch, "save", real)
    assert [r["status"] for r in rows] == ["oom"] and "epoch 1 while saving its checkpoint" in rows[0]["error"]


def test_any_other_error_still_escapes(monkeypatch, splits):
    _failing_at(monkeypatch, "evaluate", 1, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes"):
        run_trial(BASE, *splits, lambda m, c: None, checkpoint=False)


def test_raise_oom_re_raises_for_the_caller_to_retry(monkeypatch, splits):
    _failing_at(monkeypatch, "evaluate", 1, CUDA_OOM)
    rows: list[dict] = []
    with pytest.raises(torch.OutOfMemoryError):
        run_trial(BASE, *splits, lambda m, c: rows.append(m), checkpoint=False, raise_oom=True)
    assert rows == []  # nothing reported: the config is not scored


@pytest.mark.parametrize("where, message", [
    ("evaluate", r"^the test pass ran out of memory on cpu even one image at a time \(input_size 32\): lower input_size"),
    ("to_device", r"^the test pass ran out of memory on cpu copying the 40 test images there: free memory"),
])
def test_cuda_oom_in_the_final_test_pass_is_a_user_error(monkeypatch, splits, tmp_path, where, message):
    train, test = splits
    data = FinalData(train, np.arange(80), np.arange(80, 100), test, [f"c{i}" for i in range(100)],
                     [f"s{i}" for i in range(20)])
    monkeypatch.setattr(final, where, lambda *a, **k: (_ for _ in ()).throw(CUDA_OOM))
    with pytest.raises(UserError, match=message) as e:
        final.retrain_and_test({**BASE, "stage2_epochs": 0}, data, tmp_path)
    assert "\n" not in str(e.value)


# --- inference halves a batch that runs out of memory ---------------------------------------------

def _fits(limit: int, error: BaseException = CUDA_OOM):
    seen: list[int] = []

    def step(rows: slice) -> list[int]:
        seen.append(rows.stop - rows.start)
        if rows.stop - rows.start > limit:
            raise error
        return list(range(rows.start, rows.stop))
    return step, seen


def test_halving_batches_keeps_every_row_in_order_at_the_size_that_fits():
    step, seen = _fits(3)
    parts, used = halving_batches(10, 8, step)
    assert sum(parts, []) == list(range(10)) and used == 2
    assert seen == [8, 4, 2, 2, 2, 2, 2]  # 8 and 4 fail; the rest go at 2 without retrying larger


def test_halving_batches_raises_when_one_row_does_not_fit_and_lets_other_errors_through():
    step, seen = _fits(0)
    with pytest.raises(torch.OutOfMemoryError):
        halving_batches(5, 4, step)
    assert seen == [4, 2, 1]
    step, seen = _fits(0, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes"):
        halving_batches(5, 4, step)
    assert seen == [4]  # not retried: only running out of memory is


def test_evaluate_gives_the_same_numbers_when_its_batches_are_halved(splits):
    from trainable.augment import normalisation_of
    from trainable.loop import Precision, evaluate
    from trainable.model import create_model
    _, val = splits
    torch.manual_seed(0)
    net = create_model("resnet18", pretrained=False, head="coarse_to_fine").eval()
    x, fine, coarse = (torch.from_numpy(np.ascontiguousarray(a)) for a in (val.images, val.fine, val.coarse))
    kw = dict(input_size=32, mean=normalisation_of(net.backbone)[0], std=normalisation_of(net.backbone)[1],
              prec=Precision.for_device(torch.device("cpu"), "resnet18", "fp32"), return_predictions=True)
    whole = evaluate(net, x, fine, coarse, batch_size=40, **kw)
    real_forward = net.forward

    def fits_seven(xb):
        if xb.shape[0] > 7:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")
        return real_forward(xb)
    net.forward = fits_seven
    halved = evaluate(net, x, fine, coarse, batch_size=40, **kw)
    assert whole.pop("batch_size") == 40 and halved.pop("batch_size") == 5
    assert torch.equal(halved.pop("predictions"), whole.pop("predictions"))
    assert halved.keys() == whole.keys() and "coarse_head_acc" in halved
    assert halved == pytest.approx(whole, rel=1e-6)


def test_a_trial_validates_its_later_epochs_at_the_size_that_fitted(monkeypatch, splits, capsys):
    real, asked = trial.evaluate, []
    monkeypatch.setenv("CIFAR_TUNE_FEATURE_CACHE", "off")  # a cached head-only stage calls neither train_epoch nor evaluate

    def fits_25(*a, batch_size, **k):  # as if halving from 200 had settled on 25
        asked.append(batch_size)
        return {**real(*a, batch_size=batch_size, **k), "batch_size": min(batch_size, 25)}
    monkeypatch.setattr(trial, "evaluate", fits_25)
    rows: list[dict] = []
    run_trial(BASE, *splits, lambda m, c: rows.append(m), checkpoint=False)
    assert [r["status"] for r in rows] == ["ok"] * 3 and "val_batch_size" not in rows[0]
    assert asked == [200, 25, 25]  # not 200 again: the failed tries are not repeated every epoch
    assert capsys.readouterr().out.count("validation ran out of memory at eval_batch_size 200: it goes on at 25") == 1


# --- a shared GPU: the first OOM is retried --------------------------------------------------------

@pytest.mark.parametrize("gpus, shared", [(0.5, True), (0.25, True), (1.5, True), (1.0, False), (2.0, False), (0.0, False)])
def test_a_fractional_gpu_is_shared(gpus, shared):
    assert retry_first_oom(gpus, restarted=False) is shared
    assert retry_first_oom(gpus, restarted=True) is False


class _FakeTune:
    """The parts of ray.tune that tune_trial uses, for a trial holding `gpus` GPUs."""

    def __init__(self, trial_dir: Path, gpus: float, checkpoint=None):
        from ray.tune.execution.placement_groups import PlacementGroupFactory
        self.reports: list[dict] = []
        self.checkpoints: list = []
        self._checkpoint = checkpoint
        resources = PlacementGroupFactory([{"CPU": 1, "GPU": gpus}])
        self._ctx = SimpleNamespace(get_trial_dir=lambda: str(trial_dir), get_trial_resources=lambda: resources)
        self.Checkpoint = SimpleNamespace(from_directory=lambda d: d)

    def get_context(self):
        return self._ctx

    def get_checkpoint(self):
        return self._checkpoint

    def report(self, metrics, checkpoint=None):
        self.reports.append(metrics)
        self.checkpoints.append(checkpoint)


@pytest.fixture
def no_budget(monkeypatch):
    monkeypatch.setattr(search_trainable, "limit_memory", lambda budget: 0)  # not in pytest's process
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_on_a_shared_gpu_the_first_oom_restarts_the_trial_and_the_second_ends_it(
        monkeypatch, splits, tmp_path, no_budget):
    _failing_at(monkeypatch, "evaluate", 1, CUDA_OOM)
    fake = _FakeTune(tmp_path, gpus=0.5)
    monkeypatch.setattr(search_trainable, "tune", fake)
    with pytest.raises(torch.OutOfMemoryError):  # Tune restarts the trial (FailureConfig max_failures)
        search_trainable.tune_trial(BASE, *splits)
    assert fake.reports == [] and (tmp_path / search_trainable.OOM_RETRIED).exists()
    _failing_at(monkeypatch, "evaluate", 1, CUDA_OOM)  # the restart (no checkpoint yet) runs out again
    search_trainable.tune_trial(BASE, *splits)
    assert [r["status"] for r in fake.reports] == ["oom"]


@pytest.mark.parametrize("exists", [True, False])
def test_a_trial_writes_its_checkpoints_in_the_experiment_folder_when_its_node_has_it(
        monkeypatch, splits, tmp_path, no_budget, exists):
    exp = tmp_path / "exp"
    if exists:
        exp.mkdir()
    fake = _FakeTune(tmp_path, gpus=0)
    monkeypatch.setattr(search_trainable, "tune", fake)
    search_trainable.tune_trial({**BASE, "stage2_epochs": 0}, *splits, scratch=str(exp))
    parents = {Path(c).parent for c in fake.checkpoints}
    assert parents == ({exp} if exists else {Path(trial.tempfile.gettempdir())})
    assert not exists or list(exp.iterdir()) == []


@pytest.mark.parametrize("gpus", [1, 0])
def test_on_a_whole_gpu_or_the_cpu_the_first_oom_ends_the_trial(monkeypatch, splits, tmp_path, no_budget, gpus):
    _failing_at(monkeypatch, "evaluate", 1, CUDA_OOM)
    fake = _FakeTune(tmp_path, gpus=gpus)
    monkeypatch.setattr(search_trainable, "tune", fake)
    search_trainable.tune_trial(BASE, *splits)
    assert [r["status"] for r in fake.reports] == ["oom"]
    assert not (tmp_path / search_trainable.OOM_RETRIED).exists()
