"""Tests for trainable/model.py and trainable/optim.py: blocks, freezing, BN handling, heads,
parameter groups and the optimiser/schedule (random init, CPU, 32 px inputs)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models import group_parameters
from torch import nn

from trainable.config import TrialConfig
from trainable.errors import UserError
from trainable.model import (
    NUM_COARSE,
    NUM_FINE,
    Net,
    create_model,
    set_trainable,
    train_mode,
)
from trainable.optim import (
    build_optimizer,
    build_schedule,
    count_trainable,
    head_lr,
    param_groups,
)
from trainable.stages import Stage

pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONES = {  # name: (blocks, names of a parameter in the bottom and in the top block)
    "resnet18": (5, "conv1.weight", "layer4.1.conv2.weight"),
    "tf_efficientnet_lite0": (8, "conv_stem.weight", "conv_head.weight"),
}
CPU = torch.device("cpu")



def _net(name: str = "resnet18", coarse: bool = False) -> Net:
    torch.manual_seed(0)
    return create_model(name, pretrained=False, head="coarse_to_fine" if coarse else "flat")


def _batch(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def _trainable_ids(net: nn.Module) -> set[int]:
    return {id(p) for p in net.parameters() if p.requires_grad}


def _top_blocks_and_head(net: Net, k: int) -> set[int]:
    return _ids(p for b in net.blocks()[len(net.blocks()) - k:] for p in b) | _ids(net.head_parameters())


@pytest.fixture(scope="module", params=list(BACKBONES))
def any_net(request) -> tuple[str, Net]:
    return request.param, _net(request.param)


# --- blocks --------------------------------------------------------------------------------------

def test_blocks_ordered_stem_first(any_net):
    name, net = any_net
    n_blocks, bottom, top = BACKBONES[name]
    blocks = net.blocks()
    assert len(blocks) == n_blocks
    params = dict(net.backbone.named_parameters())
    assert any(p is params[bottom] for p in blocks[0])
    assert any(p is params[top] for p in blocks[-1])
    assert not any(p is params[top] for b in blocks[:-1] for p in b)


def test_block_count_matches_timm_groups(any_net):
    name, net = any_net
    groups = group_parameters(net.backbone, net.backbone.group_matcher(coarse=True))
    assert len(net.blocks()) == len(groups) == BACKBONES[name][0]
    assert [len(b) for b in net.blocks()] == [len(names) for _, names in sorted(groups.items())]


def test_every_backbone_parameter_in_exactly_one_block(any_net):
    _, net = any_net
    flat = [id(p) for b in net.blocks() for p in b]
    assert len(flat) == len(set(flat))  # no parameter twice
    assert set(flat) == _ids(net.backbone.parameters())  # and none missing
    assert not set(flat) & _ids(net.head_parameters())  # the head is not a block
    assert all(len(b) > 0 for b in net.blocks())


def test_backbone_classifier_removed(any_net):
    _, net = any_net
    out = net.backbone(_batch(2))
    assert out.shape == (2, net.backbone.num_features)


# --- set_trainable -------------------------------------------------------------------------------

def test_head_only(any_net):
    _, net = any_net
    set_trainable(net, 0)
    assert _trainable_ids(net) == _ids(net.head_parameters())
    assert count_trainable(net) == sum(p.numel() for p in net.head_parameters())
    assert count_trainable(net) == (net.backbone.num_features + 1) * NUM_FINE


def test_top_two_blocks(any_net):
    _, net = any_net
    set_trainable(net, 2)
    assert _trainable_ids(net) == _top_blocks_and_head(net, 2)


def test_all_trainable_and_refreeze(any_net):
    _, net = any_net
    set_trainable(net, None)
    assert _trainable_ids(net) == _ids(net.parameters())
    set_trainable(net, 1)  # going back freezes again
    assert _trainable_ids(net) == _top_blocks_and_head(net, 1)


def test_depth_beyond_the_network_trains_all(any_net):
    _, net = any_net
    set_trainable(net, 50)
    assert _trainable_ids(net) == _ids(net.parameters())


@pytest.mark.parametrize("name", list(BACKBONES))
def test_stage1_backward_reaches_only_the_head(name):
    net = _net(name)
    set_trainable(net, 0)
    train_mode(net)
    net(_batch()).logsumexp(1).mean().backward()
    head = _ids(net.head_parameters())
    with_grad = {id(p) for p in net.parameters() if p.grad is not None}
    assert with_grad == head
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad.abs().sum() > 0 for p in net.head_parameters())


def test_stage2_backward_reaches_top_blocks():
    net = _net("resnet18")
    set_trainable(net, 2)
    train_mode(net)
    net(_batch()).logsumexp(1).mean().backward()
    assert {id(p) for p in net.parameters() if p.grad is not None} == _top_blocks_and_head(net, 2)


# --- train_mode and BatchNorm --------------------------------------------------------------------

def _bns(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name, frozen_bn, trained_bn", [
    ("resnet18", "bn1", "layer4.1.bn2"),
    ("tf_efficientnet_lite0", "bn1", "bn2"),
])
def test_frozen_bn_keeps_running_stats(name, frozen_bn, trained_bn):
    net = _net(name)
    set_trainable(net, 2)
    train_mode(net)
    mods = dict(net.backbone.named_modules())
    frozen, trained = mods[frozen_bn], mods[trained_bn]
    assert isinstance(frozen, nn.modules.batchnorm._BatchNorm)
    assert net.training and not frozen.training and trained.training
    before_f = frozen.running_mean.clone()
    before_t = trained.running_mean.clone()
    batches_f = int(frozen.num_batches_tracked)
    net(_batch())
    assert torch.equal(frozen.running_mean, before_f)
    assert int(frozen.num_batches_tracked) == batches_f
    assert not torch.equal(trained.running_mean, before_t)
    # every BN of the frozen blocks is in eval mode, every BN of the top 2 blocks in train mode
    trainable = _top_blocks_and_head(net, 2)
    for bn in _bns(net.backbone):
        assert bn.training == (id(bn.weight) in trainable)


def test_train_mode_all_trainable_is_plain_train():
    net = _net("tf_efficientnet_lite0")
    set_trainable(net, None)
    train_mode(net)
    assert all(m.training for m in net.modules())


def test_head_only_stage_keeps_every_bn_in_eval():
    net = _net("resnet18")
    set_trainable(net, 0)
    train_mode(net)
    assert net.training and net.fine_head.training
    assert _bns(net) and not any(bn.training for bn in _bns(net))


# --- heads ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, features", [("resnet18", 512), ("tf_efficientnet_lite0", 1280)])
def test_coarse_head(name, features):
    net = _net(name, coarse=True)
    assert net.backbone.num_features == features
    assert net.fine_head.in_features == features + NUM_COARSE
    assert net.coarse_head.in_features == features and net.coarse_head.out_features == NUM_COARSE
    net.eval()
    out = net(_batch(3))
    assert isinstance(out, tuple) and len(out) == 2
    fine, coarse = out
    assert fine.shape == (3, NUM_FINE) and coarse.shape == (3, NUM_COARSE)
    assert _ids(net.head_parameters()) == _ids(net.fine_head.parameters()) | _ids(net.coarse_head.parameters())


def test_fine_head_only():
    net = _net("resnet18")
    assert net.coarse_head is None and net.fine_head.in_features == 512
    net.eval()
    out = net(_batch(2))
    assert isinstance(out, torch.Tensor) and out.shape == (2, NUM_FINE)


def test_coarse_logits_feed_the_fine_head():
    net = _net("resnet18", coarse=True)
    net.eval()
    x = _batch(2)
    fine0, _ = net(x)
    with torch.no_grad():
        net.coarse_head.bias[3] += 5.0  # change only the coarse output (a uniform shift wouldn't: softmax)
    fine1, _ = net(x)
    assert not torch.allclose(fine0, fine1)


# --- optim.param_groups --------------------------------------------------------------------------

def _group_ids(groups) -> set[int]:
    return {id(p) for g in groups for p in g["params"]}


def test_param_groups_stage1_is_the_head_only():
    net = _net("resnet18")
    groups = param_groups(net, Stage(1, 0, 1, 0.01, 0), weight_decay=1e-4)
    assert _group_ids(groups) == _ids(net.head_parameters())
    assert [g["lr"] for g in groups] == [0.01, 0.01]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]  # weight, then bias


def test_param_groups_stage2_leaves_frozen_blocks_out():
    net = _net("resnet18")
    groups = param_groups(net, Stage(2, 1, 1, 0.003, 2), weight_decay=1e-4)
    assert _group_ids(groups) == _top_blocks_and_head(net, 2)
    assert {g["lr"] for g in groups} == {0.003}
    assert _trainable_ids(net) == _group_ids(groups)  # param_groups also sets requires_grad


def test_param_groups_stage3_layer_decay_and_no_decay_for_1d():
    net = _net("resnet18")
    blocks = net.blocks()
    groups = param_groups(net, Stage(3, 2, 1, 0.1, None, layer_decay=0.5), weight_decay=5e-4)
    assert _group_ids(groups) == _ids(net.parameters())
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for i, block in enumerate(blocks):  # bottom block 0.1 * 0.5**4 .. top block 0.1
        lrs = {lr_of[id(p)] for p in block}
        assert len(lrs) == 1 and lrs.pop() == pytest.approx(0.1 * 0.5 ** (len(blocks) - 1 - i))
    assert {lr_of[id(p)] for p in net.head_parameters()} == {0.1}
    for g in groups:
        dims = {p.ndim for p in g["params"]}
        assert (dims == {1} and g["weight_decay"] == 0.0) or (min(dims) > 1 and g["weight_decay"] == 5e-4)
    assert groups[-1]["lr"] == 0.1 and any(p is net.fine_head.bias for p in groups[-1]["params"])


# --- build_optimizer -----------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, optimizer", [("cosine", "sgd"), ("onecycle", "adamw")])
def test_build_optimizer_trains_the_stage(schedule, optimizer):
    cfg = TrialConfig.from_dict({"schedule": schedule, "optimizer": optimizer})
    net = _net("resnet18")
    opt, sched = build_optimizer(net, Stage(2, 1, 1, 0.01, 1), cfg, 3, CPU)
    assert isinstance(opt, torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW)
    top, bottom = net.blocks()[-1][0], net.blocks()[0][0]
    top0, bottom0 = top.detach().clone(), bottom.detach().clone()
    train_mode(net)
    for i in range(3):
        loss = nn.functional.cross_entropy(net(_batch(size=16, seed=i)), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert not torch.equal(top, top0)  # the trainable top block moved
    assert torch.equal(bottom, bottom0)  # the frozen stem did not


@pytest.fixture(scope="module")
def sched_net() -> Net:
    return _net("resnet18")


def _lrs(net: Net, cfg: dict, steps: int, lr: float = 0.01) -> list[float]:
    """The head lr before each step of a stage of `steps` steps (no forward pass needed)."""
    opt, sched = build_optimizer(net, Stage(1, 0, 1, lr, 0), TrialConfig.from_dict(cfg), steps, CPU)
    out = []
    for _ in range(steps):
        out.append(head_lr(opt))
        opt.step()  # no grads: parameters stay put, the schedule still advances
        sched.step()
    return out


def test_cosine_schedule_values(sched_net):
    # 8 steps, 25 % warmup: 2 warmup steps (0.5, 1.0), then cosine over 6 steps
    lrs = _lrs(sched_net, {"schedule": "cosine", "warmup_frac": 0.25}, 8)
    assert lrs[:3] == pytest.approx([0.005, 0.01, 0.01])
    assert lrs[5] == pytest.approx(0.005)  # cosine half way: step 2 + 3 of 6
    assert lrs[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))


def _reference(step: int, total: int, frac: float, shape: str) -> float:
    """The schedules as written down: a linear warm-up (step + 1) / w over w = int(total * frac)
    steps, then cosine to 0, x0.1 at 30/60/90 % of the stage (BiT), or flat; a multiple of the lr."""
    w = int(total * frac)
    if step < w:
        return (step + 1) / w
    if shape == "constant":
        return 1.0
    if shape == "step":
        return 0.1 ** sum(step >= m * total for m in (0.3, 0.6, 0.9))
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


@pytest.mark.parametrize("shape", ["cosine", "step", "constant"])
@pytest.mark.parametrize("total, frac", [(1, 0.0), (5, 0.1), (7, 0.0), (10, 0.25), (33, 0.1), (100, 0.5)])
def test_schedules_share_one_warmup_and_follow_their_formula(shape, total, frac):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_schedule(opt, TrialConfig.from_dict({"schedule": shape, "warmup_frac": frac}), total)
    got = []
    for _ in range(total):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx([_reference(s, total, frac, shape) for s in range(total)], abs=1e-9)


def test_a_schedule_resumes_from_its_state_dict():
    """A checkpoint mid-warm-up: the restored scheduler continues the same lrs."""
    cfg = TrialConfig.from_dict({"schedule": "cosine", "warmup_frac": 0.3})

    def run(steps, state=None):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = build_schedule(opt, cfg, 20)
        if state is not None:
            opt.load_state_dict(state[0])
            sched.load_state_dict(state[1])
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out, (opt.state_dict(), sched.state_dict())
    straight, _ = run(20)
    first, state = run(4)
    rest, _ = run(16, state)
    assert first + rest == pytest.approx(straight)


def test_onecycle_schedule_values(sched_net):
    lrs = _lrs(sched_net, {"schedule": "onecycle", "optimizer": "sgd", "warmup_frac": 0.5}, 4)
    assert lrs[0] == pytest.approx(0.01 / 25)  # OneCycle starts at max_lr / 25 ...
    assert lrs[1] == pytest.approx(0.01)  # ... peaks after the warmup ...
    assert lrs[3] < lrs[2] < lrs[1]  # ... and anneals


@pytest.mark.parametrize("steps, warmup_frac", [(10, 0.1), (4, 0.25), (1, 0.1), (2, 0.5), (7, 0.0)])
def test_onecycle_any_step_count(sched_net, steps, warmup_frac):
    # warmup_frac * steps == 1 made OneCycleLR divide by zero (the default config at 10 steps)
    lrs = _lrs(sched_net, {"schedule": "onecycle", "warmup_frac": warmup_frac}, steps)
    assert len(lrs) == steps and all(0 < v <= 0.01 + 1e-12 for v in lrs)


def test_build_optimizer_groups_keep_their_scaled_lr_under_cosine():
    cfg = TrialConfig.from_dict({"schedule": "cosine", "warmup_frac": 0.0})
    net = _net("resnet18")
    opt, sched = build_optimizer(net, Stage(3, 0, 1, 0.1, None, layer_decay=0.5), cfg, 10, CPU)
    first = [g["lr"] for g in opt.param_groups]
    assert min(first) == pytest.approx(0.1 * 0.5 ** 4) and max(first) == pytest.approx(0.1)
    opt.step()
    sched.step()
    ratio = [g["lr"] / f for g, f in zip(opt.param_groups, first)]
    assert ratio == pytest.approx([ratio[0]] * len(ratio)) and 0 < ratio[0] < 1


# --- create_model / load_weights errors ----------------------------------------------------------

def _one_line_user_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_unknown_backbone():
    with pytest.raises(UserError) as e:
        create_model("resnet_does_not_exist", pretrained=False)
    assert "unknown backbone 'resnet_does_not_exist'" in _one_line_user_error(e)


def test_wrong_state_dict(tmp_path):
    torch.save(_net("resnet18").backbone.state_dict(), tmp_path / "tf_efficientnet_lite0.pth")
    with pytest.raises(UserError) as e:
        create_model("tf_efficientnet_lite0", pretrained=True, weights_dir=str(tmp_path))
    msg = _one_line_user_error(e)
    assert "does not fit backbone tf_efficientnet_lite0" in msg and "tf_efficientnet_lite0.pth" in msg


def test_not_a_state_dict(tmp_path):
    (tmp_path / "resnet18.pth").write_bytes(b"not a torch file\n\nat all")
    with pytest.raises(UserError) as e:
        create_model("resnet18", pretrained=True, weights_dir=str(tmp_path))
    msg = _one_line_user_error(e)
    assert "resnet18.pth cannot be read as PyTorch or safetensors weights" in msg and "not a weights file" in msg


def test_missing_weights_file(tmp_path):
    with pytest.raises(UserError) as e:
        create_model("resnet18", pretrained=True, weights_dir=str(tmp_path))
    assert "no weights file" in _one_line_user_error(e)


def test_weights_dir_round_trip(tmp_path):
    src = _net("resnet18").backbone
    # a timm state_dict with its 1000-class classifier, as saved from timm.create_model
    ref = timm.create_model("resnet18", pretrained=False)
    ref.load_state_dict({**ref.state_dict(), **src.state_dict()})
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    net = create_model("resnet18", pretrained=True, weights_dir=str(tmp_path))
    assert torch.equal(net.backbone.conv1.weight, src.conv1.weight)
    assert torch.equal(net.backbone.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var)
