"""Tests for trainable/scratch.py: 32 px stems for ResNet/VGG and the registered 32 px alexnet
(random init, CPU)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import group_parameters
from torch import nn

from trainable.errors import UserError
from trainable.model import Net
from trainable.scratch import adapt_small_input

pytestmark = pytest.mark.usefixtures("one_thread")

STEMS = {  # name: the module whose output is the stem's, and its channels
    "resnet18": ("maxpool", 64),
    "vgg13_bn": ("features.0", 64),
    "alexnet": ("features.0", 64),
}



def _backbone(name: str) -> nn.Module:
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False)
    m.reset_classifier(0)
    adapt_small_input(m, name)
    return m


def _batch(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(STEMS))
def adapted(request) -> tuple[str, nn.Module]:
    return request.param, _backbone(request.param).eval()


def test_pooled_features(adapted):
    _, m = adapted
    assert m(_batch()).shape == (2, m.num_features)


def test_stem_keeps_32px(adapted):
    name, m = adapted
    module, chs = STEMS[name]
    seen = []
    h = m.get_submodule(module).register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    try:
        m(_batch())
    finally:
        h.remove()
    assert seen == [(2, chs, 32, 32)]


def test_groups_cover_every_parameter_once(adapted):
    _, m = adapted
    groups = group_parameters(m, m.group_matcher(coarse=True))
    flat = [n for names in groups.values() for n in names]
    assert len(groups) >= 3
    assert sorted(flat) == sorted(n for n, _ in m.named_parameters())  # each exactly once


def test_data_config_has_mean_std(adapted):
    _, m = adapted
    cfg = timm.data.resolve_data_config({}, model=m)
    assert len(cfg["mean"]) == len(cfg["std"]) == 3


def test_net_on_top(adapted):
    _, m = adapted
    net = Net(m).eval()
    assert net(_batch()).shape == (2, 100)
    assert {id(p) for b in net.blocks() for p in b} == {id(p) for p in m.parameters()}


@pytest.mark.parametrize("name", list(STEMS))
def test_sgd_step(name):
    m = _backbone(name).train()
    head = nn.Linear(m.num_features, 100)
    opt = torch.optim.SGD([*m.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    y = torch.tensor([3, 7, 3, 7])
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(m(_batch(4))), y)
        loss.backward()
        losses.append(loss.item())
        if not losses[1:]:  # the stem conv learns (it is no longer a frozen-size ImageNet conv)
            stem = m.conv1 if name == "resnet18" else m.features[0]
            assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0
        opt.step()
    assert all(math.isfinite(v) for v in losses)


def test_vgg_head_is_small():
    n = sum(p.numel() for p in _backbone("vgg13_bn").parameters())
    assert n < 15e6  # timm's own is ~129M, ~120M of it the 7x7 conv pre-logits


def test_resnet_stem_is_cifar_style():
    m = _backbone("resnet18")
    assert (m.conv1.kernel_size, m.conv1.stride, m.conv1.bias) == ((3, 3), (1, 1), None)
    assert isinstance(m.maxpool, nn.Identity)


@pytest.mark.parametrize("name", ["mobilenetv2_100", "resnet18d"])  # other family; deep stem
def test_unsupported_raises_one_line(name):
    m = timm.create_model(name, pretrained=False)
    with pytest.raises(UserError) as e:
        adapt_small_input(m, name)
    msg = str(e.value)
    assert name in msg and "\n" not in msg and ": " in msg


def test_alexnet_is_a_timm_model():
    assert timm.is_model("alexnet")
    m = timm.create_model("alexnet", pretrained=False, num_classes=10)
    assert m(_batch()).shape == (2, 10)
    assert m.forward_head(m.forward_features(_batch()), pre_logits=True).shape == (2, m.num_features)
    assert 1e6 < sum(p.numel() for p in m.parameters()) < 10e6
    cfg = timm.models.get_pretrained_cfg("alexnet")
    assert not (cfg.url or cfg.hf_hub_id or cfg.file)  # nothing for timm to download
    with pytest.raises(RuntimeError):  # timm refuses rather than silently random-initialising
        timm.create_model("alexnet", pretrained=True)


def test_reimport_registers_again_quietly():
    code = ("import importlib, timm, trainable.scratch as s; importlib.reload(s); "
            "assert timm.create_model('alexnet').num_features == 1024")
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
