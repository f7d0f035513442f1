"""Tests for trainable.augment (CPU, fast)."""

import dataclasses
import math

import pytest
import torch

from trainable.augment import (
    AugPolicy,
    DeviceAugment,
    affine_resize,
    aug_policy,
    eval_transform,
    homography_resize,
    normalisation_of,
    parse_augment,
    policy_for,
)

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


# --- explicit augmentation list ------------------------------------------------------------------

ALL_OPS = "flip, rotate, translate, zoom, jitter, erase, perspective, blur, grayscale"


def _spec_of(p: AugPolicy) -> str:
    """The explicit list that should parse back to `p` (test-side inverse of parse_augment)."""
    items = ["flip"] if p.flip else []
    for name, v in (("rotate", p.max_rotate_deg), ("translate", p.max_translate),
                    ("zoom", (p.zoom[1] - p.zoom[0]) / 2), ("jitter", p.color_jitter),
                    ("erase", p.erase_prob), ("perspective", p.perspective),
                    ("blur", p.blur_prob), ("grayscale", p.grayscale_prob)):
        if v > 0:
            items.append(f"{name}={v!r}")
    return ", ".join(items) or "none"


def _fields(p: AugPolicy) -> list[float]:
    flat = []
    for v in dataclasses.astuple(p):
        flat.extend(v if isinstance(v, tuple) else [float(v)])
    return flat


def test_parse_bare_names_are_strength_one():
    assert parse_augment(ALL_OPS) == aug_policy(1)
    assert parse_augment(" grayscale,blur ,perspective,erase,jitter,zoom,translate,rotate,flip ") \
        == aug_policy(1)  # order and whitespace do not matter


def test_parse_none_is_everything_off():
    none = parse_augment("none")
    assert none == parse_augment(" none ") == dataclasses.replace(aug_policy(0), flip=False)
    assert parse_augment("flip") == aug_policy(0)


def test_parse_values_map_to_fields():
    p = parse_augment("rotate=7.5, translate = 0.25, zoom=0.1, jitter=0.3, erase=0.5,"
                      "perspective=0.2, blur=1, grayscale=0.75")
    assert not p.flip and p.max_rotate_deg == 7.5 and p.max_translate == 0.25
    assert p.zoom == pytest.approx((0.9, 1.1)) and p.color_jitter == 0.3 and p.erase_prob == 0.5
    assert p.perspective == 0.2 and p.blur_prob == 1.0 and p.grayscale_prob == 0.75
    assert p.blur_sigma == aug_policy(1).blur_sigma and p.erase_area == aug_policy(1).erase_area


@pytest.mark.parametrize("name", ALL_OPS.split(", "))
def test_parse_single_op_turns_on_only_that_op(name):
    none, one = _fields(parse_augment("none")), _fields(parse_augment(name))
    full = _fields(aug_policy(1))
    changed = [i for i, (a, b) in enumerate(zip(none, one)) if a != b]
    assert changed and all(one[i] == pytest.approx(full[i]) for i in changed)
    others = [n for n in ALL_OPS.split(", ") if n != name]
    assert all(_fields(parse_augment(o))[i] == none[i] for o in others for i in changed)


@pytest.mark.parametrize("p", [aug_policy(0), aug_policy(0.3), aug_policy(1), parse_augment("none"),
                               parse_augment("zoom=0.05, blur=0.9, perspective=0.01")])
def test_parse_round_trip(p):
    assert _fields(parse_augment(_spec_of(p))) == pytest.approx(_fields(p))
    assert _spec_of(parse_augment(_spec_of(p))) == _spec_of(p)


def test_policy_for():
    assert policy_for(0.3, "") == aug_policy(0.3) and policy_for(0.7, "  ") == aug_policy(0.7)
    assert policy_for(0.3, "flip, blur") == policy_for(1.0, "flip, blur")
    assert policy_for(0.3, "flip, blur") == parse_augment("flip,blur")
    with pytest.raises(ValueError):
        policy_for(1.5, "")
    with pytest.raises(ValueError, match="spin"):
        policy_for(0.5, "spin")


@pytest.mark.parametrize("spec, item, why", [
    ("flip, spin=3", "spin=3", "unknown op 'spin'"),
    ("Flip", "Flip", "unknown op"),
    ("rotate, rotate=3", "rotate=3", "repeated"),
    ("flip,blur,flip", "flip", "repeated"),
    ("rotate=ten", "rotate=ten", "not a number"),
    ("rotate=", "rotate=", "not a number"),
    ("erase=1.5", "erase=1.5", "[0, 1]"),
    ("blur=-0.1", "blur=-0.1", "[0, 1]"),
    ("grayscale=2", "grayscale=2", "[0, 1]"),
    ("rotate=181", "rotate=181", "[0, 180]"),
    ("rotate=nan", "rotate=nan", "[0, 180]"),
    ("translate=inf", "translate=inf", "[0, 1]"),
    ("zoom=1", "zoom=1", "[0, 1)"),
    ("perspective=0.5", "perspective=0.5", "[0, 0.5)"),
    ("flip=1", "flip=1", "no value"),
    ("none, flip", "none", "only item"),
    ("none=1", "none=1", "only item"),
    ("flip,,blur", "", "empty item"),
])
def test_parse_errors_name_the_item(spec, item, why):
    with pytest.raises(ValueError) as e:
        parse_augment(spec)
    msg = str(e.value)
    assert "\n" not in msg and f"augment item {item!r}:" in msg and why in msg
    assert "valid: flip, rotate=DEG, translate=FRAC, zoom=FRAC, jitter=AMP, erase=P, " \
           "perspective=D, blur=P, grayscale=P" in msg


@pytest.mark.parametrize("spec", ["", "   "])
def test_parse_empty_spec_raises(spec):
    with pytest.raises(ValueError, match="empty"):
        parse_augment(spec)


# --- new ops: policy ends -------------------------------------------------------------------------

def test_policy_new_ops_strength_ends():
    p0, p1, half = aug_policy(0), aug_policy(1), aug_policy(0.5)
    assert p0.perspective == 0 and p0.blur_prob == 0 and p0.grayscale_prob == 0
    assert p1.perspective == pytest.approx(0.1) and p1.blur_prob == pytest.approx(0.2)
    assert p1.grayscale_prob == pytest.approx(0.1) and p1.blur_sigma == pytest.approx((0.1, 1.0))
    assert half.perspective == pytest.approx(0.05) and half.blur_prob == pytest.approx(0.1)
    assert half.grayscale_prob == pytest.approx(0.05) and p0.blur_sigma == p1.blur_sigma


# --- grayscale ------------------------------------------------------------------------------------

UNIT = ((0.5,) * 3, (0.5,) * 3)  # same normalisation per channel: grey stays R == G == B


def test_grayscale_p1_is_luma_per_image():
    x = _images(16)
    pol = dataclasses.replace(_off(), grayscale_prob=1.0)
    out = DeviceAugment(pol, 32, *UNIT)(x, torch.Generator().manual_seed(0)) * 0.5 + 0.5
    want = (x.float() / 255 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
    assert (out - want).abs().max() < 1e-5
    # Still grey after the full geometric pass and resize.
    pol = dataclasses.replace(aug_policy(1), grayscale_prob=1.0, color_jitter=0, erase_prob=0)
    out = DeviceAugment(pol, 64, *UNIT)(x, torch.Generator().manual_seed(0))
    assert (out - out[:, :1]).abs().max() < 1e-5 and (x[:, 0] != x[:, 1]).any()


def test_grayscale_p0_changes_nothing_and_half_is_per_image():
    x, g = _images(128), lambda: torch.Generator().manual_seed(3)
    ref = DeviceAugment(_off(), 32, *UNIT)(x, g())
    zero = DeviceAugment(dataclasses.replace(_off(), grayscale_prob=0.0), 32, *UNIT)
    assert torch.equal(zero(x, g()), ref)
    out = DeviceAugment(dataclasses.replace(_off(), grayscale_prob=0.5), 32, *UNIT)(x, g())
    grey = (out - out[:, :1]).abs().amax((1, 2, 3)) < 1e-6
    same = (out - ref).abs().amax((1, 2, 3)) == 0
    assert bool((grey ^ same).all()) and 32 < int(grey.sum()) < 96


# --- blur -----------------------------------------------------------------------------------------

def _blur_only(prob: float, sigma: tuple[float, float]) -> DeviceAugment:
    return DeviceAugment(dataclasses.replace(_off(), blur_prob=prob, blur_sigma=sigma), 32,
                         (0.0,) * 3, (1.0,) * 3)  # identity normalisation: output in 0..1


def _high_freq(x: torch.Tensor) -> torch.Tensor:
    """Mean squared neighbour difference per image."""
    return (x.diff(dim=-1) ** 2).mean((1, 2, 3)) + (x.diff(dim=-2) ** 2).mean((1, 2, 3))


def test_blur_kills_checkerboard_keeps_mean():
    idx = torch.arange(32)
    board = ((idx[:, None] + idx[None]) % 2 * 255).to(torch.uint8).expand(8, 3, 32, 32)
    out = _blur_only(1.0, (0.8, 1.0))(board.contiguous(), torch.Generator().manual_seed(0))
    before = _high_freq(board.float() / 255)
    assert bool((_high_freq(out) < 0.01 * before).all())
    assert out.mean((1, 2, 3)) == pytest.approx(torch.full((8,), 0.5), abs=0.01)


def test_blur_matches_torchvision_gaussian_blur():
    from torchvision.transforms.v2.functional import gaussian_blur

    x = _images(4)
    out = _blur_only(1.0, (0.7, 0.7))(x, torch.Generator().manual_seed(0))
    # radius ceil(3 * 0.7) = 3; both reflect-pad
    want = gaussian_blur(x.float() / 255, kernel_size=[7, 7], sigma=[0.7, 0.7])
    assert (out - want).abs().max() < 1e-5


def test_blur_kernel_is_per_image():
    n = 32
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    x[:, :, 16, 16] = 255
    out = _blur_only(1.0, (0.3, 1.5))(x, torch.Generator().manual_seed(0))
    assert (out - out[:, :1]).abs().max() < 1e-6  # an image's three channels share its kernel
    r = out[:, 0]
    assert r.sum((1, 2)) == pytest.approx(torch.ones(n), abs=1e-4)
    col, row = r.sum(2), r.sum(1)  # separable: the response is the outer product of marginals
    assert (r - col[:, :, None] * row[:, None, :]).abs().max() < 1e-5
    k = torch.arange(32.0) - 16
    var = (row * k**2).sum(1)

    def kernel_var(sigma: float) -> float:  # sampled Gaussian, radius ceil(3 * 1.5)
        w = torch.exp(-0.5 * (torch.arange(-5.0, 6) / sigma) ** 2)
        return float((w * torch.arange(-5.0, 6) ** 2).sum() / w.sum())

    assert bool(((var > kernel_var(0.3) - 1e-5) & (var < kernel_var(1.5) + 1e-5)).all())
    assert float(var.max() - var.min()) > 1.0  # sigmas differ between images


def test_blur_p0_identity_and_half_is_per_image():
    x, g = _images(128), lambda: torch.Generator().manual_seed(4)
    ref = _blur_only(0.0, (0.1, 1.0))(x, g())
    assert (ref - x.float() / 255).abs().max() < 1e-6
    out = _blur_only(0.5, (0.5, 1.0))(x, g())
    same = (out - ref).abs().amax((1, 2, 3)) == 0
    assert bool(((_high_freq(out) < 0.5 * _high_freq(ref)) | same).all())
    assert 32 < int(same.sum()) < 96


# --- perspective ----------------------------------------------------------------------------------

def _affine_h(theta: torch.Tensor) -> torch.Tensor:
    return torch.cat([theta, torch.tensor([0.0, 0, 1]).expand(theta.shape[0], 1, 3)], 1)


@pytest.mark.parametrize("size", [32, 96])
def test_affine_homography_matches_affine_resize(size):
    x = _images(8).float() / 255
    g = torch.Generator().manual_seed(0)
    theta = torch.eye(2, 3) + 0.3 * (torch.rand(8, 2, 3, generator=g) - 0.5)
    want = affine_resize(x, theta, size)
    assert (homography_resize(x, _affine_h(theta), size) - want).abs().max() < 1e-5
    eye = _affine_h(torch.eye(2, 3).expand(8, 2, 3))
    assert (homography_resize(x, eye, size) - affine_resize(x, eye[:, :2], size)).abs().max() < 1e-5


def test_homography_samples_the_projected_point():
    # Bilinear interpolation of a linear ramp is exact, so the output is the sampled coordinate.
    src, size = 64, 32
    c = (torch.arange(src) * 2 + 1) / src - 1
    ramp = torch.stack([c.expand(src, src), c[:, None].expand(src, src)])[None]  # x, y
    h = torch.tensor([[[0.7, 0.1, 0.05], [-0.05, 0.6, 0.0], [0.12, -0.08, 1.0]]])
    out = homography_resize(ramp, h, size)[0]
    q = (torch.arange(size) * 2 + 1) / size - 1
    yy, xx = torch.meshgrid(q, q, indexing="ij")
    p = torch.einsum("ij,jhw->ihw", h[0], torch.stack([xx, yy, torch.ones_like(xx)]))
    want = p[:2] / p[2:]
    assert want.abs().max() < 1 - 1 / src  # no border sample: the ramp is exact everywhere
    assert (out - want).abs().max() < 1e-5


def _geometric(perspective: float) -> AugPolicy:
    return dataclasses.replace(aug_policy(1), color_jitter=0, erase_prob=0, blur_prob=0,
                               grayscale_prob=0, perspective=perspective)


def test_perspective_tilts_every_image_and_stays_valid():
    x, g = _images(64), lambda: torch.Generator().manual_seed(7)
    flat = DeviceAugment(_geometric(0.0), 64, MEAN, STD)(x, g())
    tilted = DeviceAugment(_geometric(0.1), 64, MEAN, STD)(x, g())
    assert torch.isfinite(tilted).all() and tilted.shape == flat.shape
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    unit = tilted * s + m  # bilinear samples are convex combinations: still inside 0..1
    assert bool(((unit >= -TOL) & (unit <= 1 + TOL)).all())
    assert bool(((tilted - flat).abs().amax((1, 2, 3)) > 0.1).all())
    # Same draws for the affine part: a vanishing tilt is the affine path.
    tiny = DeviceAugment(_geometric(1e-7), 64, MEAN, STD)(x, g())
    assert (tiny - flat).abs().max() < 1e-3
    # Near the w > 0 limit the output is still finite.
    assert torch.isfinite(DeviceAugment(_geometric(0.499), 64, MEAN, STD)(x, g())).all()


def test_perspective_on_constant_image_is_constant():
    x = torch.full((4, 3, 32, 32), 90, dtype=torch.uint8)
    out = DeviceAugment(_geometric(0.3), 48, *UNIT)(x, torch.Generator().manual_seed(0))
    assert (out - (90 / 255 - 0.5) / 0.5).abs().max() < TOL


def test_all_ops_reproducible_per_seed():
    pol = dataclasses.replace(aug_policy(1), blur_prob=0.5, grayscale_prob=0.5, perspective=0.2)
    x, aug = _images(16), DeviceAugment(pol, 48, MEAN, STD)
    a = aug(x, torch.Generator().manual_seed(11))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(11)))
    assert not torch.allclose(a, aug(x, torch.Generator().manual_seed(12)))


# --- timm normalisation -----------------------------------------------------------------------

def test_normalisation_of_timm_models():
    import timm

    mean, std = normalisation_of(timm.create_model("resnet18", pretrained=False))
    assert mean == pytest.approx(MEAN) and std == pytest.approx(STD)
    mean, std = normalisation_of(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    assert mean == pytest.approx((0.5,) * 3) and std == pytest.approx((0.5,) * 3)
