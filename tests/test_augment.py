"""Tests for trainable.augment (CPU, fast)."""

import dataclasses
import math

import pytest
import torch

from trainable.augment import (AugPolicy, DeviceAugment, affine_resize, aug_policy,
                               eval_transform, normalisation_of)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOL = 1e-4


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _off() -> AugPolicy:
    return dataclasses.replace(aug_policy(0.0), flip=False)


# --- aug_policy -------------------------------------------------------------------------------

def test_policy_zero_is_flip_only():
    p = aug_policy(0)
    assert p.flip and p.max_rotate_deg == 0 and p.max_translate == 0 and p.zoom == (1.0, 1.0)
    assert p.color_jitter == 0 and p.erase_prob == 0


def test_policy_one_documented_values():
    p = aug_policy(1)
    assert p.flip and p.max_translate == pytest.approx(0.125) and p.max_rotate_deg == 15
    assert p.zoom == pytest.approx((0.8, 1.2)) and p.color_jitter == pytest.approx(0.4)
    assert p.erase_prob == pytest.approx(0.25) and p.erase_area == pytest.approx((0.02, 0.2))


def test_policy_monotonic_and_linear():
    ps = [aug_policy(s / 10) for s in range(11)]
    for a, b in zip(ps, ps[1:]):
        assert b.max_rotate_deg > a.max_rotate_deg and b.max_translate > a.max_translate
        assert b.zoom[0] < a.zoom[0] and b.zoom[1] > a.zoom[1]
        assert b.color_jitter > a.color_jitter and b.erase_prob > a.erase_prob
    assert ps[5].max_rotate_deg == pytest.approx(7.5) and ps[5].zoom == pytest.approx((0.9, 1.1))


@pytest.mark.parametrize("bad", [-0.01, 1.01, math.nan, math.inf])
def test_policy_out_of_range_raises(bad):
    with pytest.raises(ValueError):
        aug_policy(bad)


# --- geometry -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 64, 96, 224])
def test_identity_geometry_matches_eval(size):
    x = _images(8)
    want = eval_transform(x, size, MEAN, STD)
    theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(8, 2, 3)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    warped = (affine_resize(x.float() / 255, theta, size) - m) / s
    assert (warped - want).abs().max() < TOL
    # All-off policy through the module's own path.
    assert (DeviceAugment(_off(), size, MEAN, STD)(x) - want).abs().max() < TOL


@pytest.mark.parametrize("size", [32, 96])
def test_strength_zero_is_eval_or_its_flip(size):
    x = _images(256)
    out = DeviceAugment(aug_policy(0), size, MEAN, STD)(x, torch.Generator().manual_seed(1))
    ref = eval_transform(x, size, MEAN, STD)
    same = (out - ref).abs().amax((1, 2, 3)) < TOL
    flipped = (out - ref.flip(-1)).abs().amax((1, 2, 3)) < TOL
    assert bool((same | flipped).all())
    assert 64 < int(flipped.sum()) < 192  # independent per image, p=0.5


# --- shapes, dtype, normalisation ------------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_shape_dtype_device(size, strength):
    out = DeviceAugment(aug_policy(strength), size, MEAN, STD)(_images(4))
    assert out.shape == (4, 3, size, size) and out.dtype == torch.float32
    assert out.device == torch.device("cpu")
    ev = eval_transform(_images(4), size, MEAN, STD)
    assert ev.shape == (4, 3, size, size) and ev.dtype == torch.float32


@pytest.mark.parametrize("v", [0, 77, 200, 255])
def test_constant_grey_normalisation(v):
    x = torch.full((2, 3, 32, 32), v, dtype=torch.uint8)
    want = ((v / 255 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    for out in (eval_transform(x, 64, MEAN, STD), DeviceAugment(_off(), 64, MEAN, STD)(x),
                DeviceAugment(dataclasses.replace(aug_policy(1), color_jitter=0, erase_prob=0),
                              64, MEAN, STD)(x)):
        assert (out - want).abs().max() < TOL


def test_rejects_non_uint8():
    with pytest.raises(ValueError):
        eval_transform(torch.zeros(1, 3, 32, 32), 32, MEAN, STD)


# --- randomness ---------------------------------------------------------------------------------

def test_strength_one_per_image_and_reproducible():
    x = _images(1).expand(16, -1, -1, -1).contiguous()
    aug = DeviceAugment(aug_policy(1), 64, MEAN, STD)
    a = aug(x, torch.Generator().manual_seed(123))
    b = aug(x, torch.Generator().manual_seed(123))
    c = aug(x, torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    diffs = (a[:, None] - a[None]).abs().amax((2, 3, 4))
    assert bool((diffs + torch.eye(16) * 1e9 > 1e-3).all())  # every pair of copies differs


def test_random_erasing_rectangle():
    size, n = 64, 64
    pol = AugPolicy(flip=False, max_rotate_deg=0, max_translate=0, zoom=(1.0, 1.0),
                    color_jitter=0, erase_prob=1.0, erase_area=(0.02, 0.2))
    x = torch.randint(1, 255, (n, 3, 32, 32), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    out = DeviceAugment(pol, size, MEAN, STD)(x, torch.Generator().manual_seed(5))
    zero = (out == 0).all(1)  # [n,S,S]; a natural pixel is never exactly the mean in all channels
    for m in zero:
        area = int(m.sum())
        assert 0.5 * 0.02 * size**2 <= area <= 1.5 * 0.2 * size**2
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(box) == area  # a solid rectangle
    areas = zero.sum((1, 2)).float() / size**2
    assert float(areas.max() - areas.min()) > 0.05  # independent sizes per image


# --- timm normalisation -----------------------------------------------------------------------

def test_normalisation_of_timm_models():
    import timm

    mean, std = normalisation_of(timm.create_model("resnet18", pretrained=False))
    assert mean == pytest.approx(MEAN) and std == pytest.approx(STD)
    mean, std = normalisation_of(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    assert mean == pytest.approx((0.5,) * 3) and std == pytest.approx((0.5,) * 3)
