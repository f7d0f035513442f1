"""channels_last on the CPU changes speed, not results: a few SGD steps agree with the contiguous
layout up to float noise; and Precision.for_device picks the layout per backbone."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from trainable import loop
from trainable.loop import Precision
from trainable.model import create_model, set_trainable, train_mode

RTOL = 1e-4  # per step
STEPS, BATCH, SIZE = 4, 8, 32
# A random-init net at batch 8 is chaotic: at usual lrs float noise grows ~200x a step (contiguous
# at 1 vs 2 threads drifts apart as fast as the two layouts; in float64 they agree to 1e-8). At
# this lr its gradients (norm ~300) still move the loss ~1e-3 a step, so a wrong step shows, while
# the noise stays ~1e-5 over STEPS steps.
LR = 1e-6


def _losses(net: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], *,
            channels_last: bool, lr: float = LR) -> list[float]:
    """Train `net` (a private copy) on `batches` in one layout; the loss of every step."""
    net = copy.deepcopy(net)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=fmt)
    set_trainable(net, None)
    train_mode(net)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    torch.manual_seed(2)  # the same dropout masks in both runs
    out = []
    for x, y in batches:
        loss = F.cross_entropy(net(x.contiguous(memory_format=fmt)), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def _agree(a: list[float], b: list[float], rtol: float = RTOL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(abs(x), abs(y)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def setup():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest on the shared machine
    torch.manual_seed(0)
    net = create_model("tf_efficientnet_lite0", pretrained=False)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, 3, SIZE, SIZE, generator=g), torch.randint(0, 100, (BATCH,), generator=g))
               for _ in range(STEPS)]
    yield net, batches
    torch.set_num_threads(before)


def test_channels_last_trains_like_contiguous(setup):
    net, batches = setup
    contiguous = _losses(net, batches, channels_last=False)
    nhwc = _losses(net, batches, channels_last=True)
    assert _agree(contiguous, nhwc), (contiguous, nhwc)
    assert len(set(contiguous)) == STEPS  # the losses move: the steps really trained


def test_a_different_run_does_not_agree(setup):
    """The comparison can fail: twice the lr gives other losses from step 2 on."""
    net, batches = setup
    contiguous = _losses(net, batches, channels_last=False)
    other = _losses(net, batches, channels_last=True, lr=2 * LR)
    assert contiguous[0] == pytest.approx(other[0], rel=RTOL)  # step 1 runs before any update
    assert not _agree(contiguous, other)


def test_cpu_uses_channels_last():
    prec = Precision.for_device(torch.device("cpu"), "tf_efficientnet_lite0")
    assert prec.channels_last and prec.amp_dtype is None


def test_cpu_contiguous_backbones_stay_contiguous(monkeypatch):
    monkeypatch.setattr(loop, "CPU_CONTIGUOUS", frozenset({"tf_efficientnet_lite0"}))
    assert not Precision.for_device(torch.device("cpu"), "tf_efficientnet_lite0").channels_last
    assert Precision.for_device(torch.device("cpu"), "resnet18").channels_last


def test_model_to_moves_the_model_in_its_layout():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    Precision(torch.device("cpu"), None, True).model_to(net)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not net[0].weight.is_contiguous()
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    Precision(torch.device("cpu"), None, False).model_to(fresh)
    assert fresh[0].weight.is_contiguous()
