"""Batched on-device augmentation of uint8 image tensors (airbench style: no PIL, no DataLoader).

Every image of a batch gets its own random parameters (torchvision's v2 transforms draw one set per
call): colour jitter, grayscale and blur at source resolution, then one resampling pass that flips,
rotates, translates, zooms, tilts and resizes to the input size, then normalisation and erasing.
`aug_policy(strength)` scales each op of _OPS from off (0, flip only) to its strength-1 value (1);
an explicit list ("flip, rotate=10, blur": unnamed ops off, "none" alone turns all off) overrides it.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey, as torchvision's rgb_to_grayscale
_ERASE_LOG_RATIO = (math.log(0.3), math.log(3.3))  # torchvision RandomErasing's aspect range
_N_DRAWS = 18  # uniforms per image, see DeviceAugment.forward


@dataclass(frozen=True)
class AugPolicy:
    """What to randomise and how much; each image draws its own value uniformly within these bounds."""

    flip: bool  # horizontal, p = 0.5
    max_rotate_deg: float
    max_translate: float  # fraction of image size, per axis
    zoom: tuple[float, float]  # content scale range; > 1 magnifies
    color_jitter: float  # brightness/contrast/saturation factors in [1 - c, 1 + c]
    erase_prob: float  # one rectangle ...
    erase_area: tuple[float, float]  # ... of this fraction of the output image
    perspective: float = 0.0  # max |px|, |py| of the homography's third row: d bends an edge to (1+d)/(1-d) at most
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # Gaussian sigma range in source pixels
    grayscale_prob: float = 0.0  # ITU-R 601 grey


# Explicit-list ops: name -> (value placeholder, strength-1 value, upper bound, inclusive?).
# Lower bounds are all 0; zoom < 1 keeps the scale positive, perspective < 0.5 keeps w > 0.
_OPS = {
    "rotate": ("DEG", 15.0, 180.0, True),
    "translate": ("FRAC", 0.125, 1.0, True),
    "zoom": ("FRAC", 0.2, 1.0, False),
    "jitter": ("AMP", 0.4, 1.0, True),
    "erase": ("P", 0.25, 1.0, True),
    "perspective": ("D", 0.1, 0.5, False),
    "blur": ("P", 0.2, 1.0, True),
    "grayscale": ("P", 0.1, 1.0, True),
}
_VALID = ", ".join(["flip", *(f"{k}={v[0]}" for k, v in _OPS.items()), "none (alone)"])


def _build(flip: bool, v: dict[str, float]) -> AugPolicy:
    """Policy from op values (a missing op is off)."""
    z = v.get("zoom", 0.0)
    return AugPolicy(flip=flip, max_rotate_deg=v.get("rotate", 0.0),
                     max_translate=v.get("translate", 0.0), zoom=(1.0 - z, 1.0 + z),
                     color_jitter=v.get("jitter", 0.0), erase_prob=v.get("erase", 0.0),
                     erase_area=(0.02, 0.2), perspective=v.get("perspective", 0.0),
                     blur_prob=v.get("blur", 0.0), grayscale_prob=v.get("grayscale", 0.0))


def aug_policy(strength: float) -> AugPolicy:
    """Map strength in [0, 1] linearly from flip-only (0) to the full policy (1)."""
    if not 0.0 <= strength <= 1.0:  # also rejects NaN
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    s = float(strength)
    return _build(True, {k: full * s for k, (_, full, _, _) in _OPS.items()})


def parse_augment(spec: str) -> AugPolicy:
    """Policy from an explicit op list, e.g. "flip, rotate=10, blur" (a bare name: its strength-1 value);
    ValueError (one line: the bad item and the valid names) on anything malformed."""
    if not spec.strip():
        raise ValueError(f"augment spec is empty; name ops or 'none'; valid: {_VALID}")
    items = [s.strip() for s in spec.split(",")]
    if items == ["none"]:
        return _build(False, {})
    flip, values = False, {}
    for item in items:
        name, eq, raw = (s.strip() for s in item.partition("="))

        def bad(why: str, item: str = item) -> ValueError:
            return ValueError(f"augment item {item!r}: {why}; valid: {_VALID}")

        if not item:
            raise bad("empty item")
        if name == "none":
            raise bad("'none' takes no value and must be the only item")
        if name == "flip":
            if eq:
                raise bad("flip takes no value")
            if flip:
                raise bad("op 'flip' repeated")
            flip = True
            continue
        if name not in _OPS:
            raise bad(f"unknown op {name!r}")
        if name in values:
            raise bad(f"op {name!r} repeated")
        _, full, hi, hi_ok = _OPS[name]
        if not eq:
            values[name] = full
            continue
        try:
            value = float(raw)
        except ValueError:
            raise bad(f"value {raw!r} is not a number") from None
        if not (0.0 <= value <= hi if hi_ok else 0.0 <= value < hi):  # also rejects NaN
            raise bad(f"{name} must be in [0, {hi:g}{']' if hi_ok else ')'}")
        values[name] = value
    return _build(flip, values)


def policy_for(strength: float, spec: str) -> AugPolicy:
    """The explicit list `spec` if given (strength ignored), else `aug_policy(strength)`."""
    return parse_augment(spec) if spec.strip() else aug_policy(strength)


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel, in place (callers pass a fresh tensor)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 in 0..1."""
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 [B,3,H,W], got {x.dtype} {tuple(x.shape)}")
    return x.float().div_(255.0)


def eval_transform(x: torch.Tensor, input_size: int, mean: tuple[float, ...],
                   std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B,3,H,W] -> normalised float32 [B,3,S,S]: bilinear resize only, no randomness."""
    x = _to_unit(x)
    if x.shape[-2:] != (input_size, input_size):
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return _normalise(x, mean, std)


def affine_resize(x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Resample float [B,C,H,W] through per-image 2x3 `theta` (output -> input, normalised coordinates)
    to [B,C,size,size] in one bilinear pass. Reflection padding: at identity it matches F.interpolate
    (train and eval geometry agree), and moved images get mirrored content, not black bands."""
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def homography_resize(x: torch.Tensor, h: torch.Tensor, size: int) -> torch.Tensor:
    """`affine_resize` through per-image 3x3 homographies `h` [B,3,3]: output pixel (x, y, 1)
    samples the input at (h @ (x, y, 1)) / w, normalised coordinates, reflection padding."""
    # Pixel centres as affine_grid with align_corners=False, so an affine h matches that path.
    c = (torch.arange(size, device=x.device, dtype=x.dtype) * 2 + 1) / size - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    base = torch.stack([xx, yy, torch.ones_like(xx)], -1).view(1, -1, 3)
    p = base @ h.to(x.dtype).transpose(1, 2)  # [B,S*S,3]
    grid = (p[..., :2] / p[..., 2:]).view(-1, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma [B,1,H,W] of float RGB [B,3,H,W]."""
    luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * luma).sum(1, keepdim=True)


def _jitter(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation with per-image factors [B] (torchvision's blends)."""
    x = (x * b.view(-1, 1, 1, 1)).clamp_(0, 1)
    x = torch.lerp(_grey(x).mean((2, 3), keepdim=True), x, c.view(-1, 1, 1, 1)).clamp_(0, 1)
    return torch.lerp(_grey(x), x, s.view(-1, 1, 1, 1)).clamp_(0, 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Gaussian blur of float [B,C,H,W] with per-image sigma [B] (pixels), kernel 2*radius+1: separable
    depthwise convs over B*C channels (each image its own kernel), reflect padding as torchvision's."""
    n, ch, hh, ww = x.shape
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    g = torch.exp(-0.5 * (k / sigma.clamp(min=1e-6)[:, None]) ** 2)  # tiny sigma -> delta
    g = (g / g.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # [B*C,K], one row per channel
    y = x.reshape(1, n * ch, hh, ww)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), g.view(n * ch, 1, 1, -1),
                 groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), g.view(n * ch, 1, -1, 1),
                 groups=n * ch)
    return y.view(n, ch, hh, ww)


def _erase_mask(u: torch.Tensor, policy: AugPolicy, size: int) -> torch.Tensor:
    """Per-image rectangle mask [B,1,S,S] from uniforms u [B,5] (apply, area, ratio, y, x)."""
    lo, hi = policy.erase_area
    area = lo + (hi - lo) * u[:, 1]
    ratio = torch.exp(_ERASE_LOG_RATIO[0] + (_ERASE_LOG_RATIO[1] - _ERASE_LOG_RATIO[0]) * u[:, 2])
    h = (size * torch.sqrt(area * ratio)).round().clamp(1, size)
    w = (size * torch.sqrt(area / ratio)).round().clamp(1, size)
    y0 = (u[:, 3] * (size - h + 1)).floor()  # top-left so the rectangle fits entirely
    x0 = (u[:, 4] * (size - w + 1)).floor()
    idx = torch.arange(size, device=u.device, dtype=u.dtype)
    rows = (idx >= y0[:, None]) & (idx < (y0 + h)[:, None])
    cols = (idx >= x0[:, None]) & (idx < (x0 + w)[:, None])
    mask = rows[:, :, None] & cols[:, None, :] & (u[:, 0] < policy.erase_prob)[:, None, None]
    return mask[:, None]


def draws(batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The uniforms DeviceAugment draws for a batch, [batch, _N_DRAWS] on `device`, all at once on the
    generator's device (a CPU generator can drive CUDA data), so the stream does not depend on the ops on."""
    dev = generator.device if generator is not None else device
    return torch.rand(batch, _N_DRAWS, generator=generator, device=dev).to(device)


def flipped(u: torch.Tensor) -> torch.Tensor:
    """Which images of a batch a flip policy mirrors, bool [B], from its `draws`."""
    return u[:, 0] < 0.5


def beyond_flip(policy: AugPolicy) -> bool:
    """Whether the policy does anything besides a horizontal flip (an image has more views than two)."""
    off = aug_policy(0.0)
    return replace(policy, flip=off.flip, erase_area=off.erase_area, blur_sigma=off.blur_sigma) != off


class DeviceAugment(torch.nn.Module):
    """Training transform: uint8 batch -> augmented, resized, normalised float32 batch."""

    def __init__(self, policy: AugPolicy, input_size: int, mean: tuple[float, float, float],
                 std: tuple[float, float, float]) -> None:
        super().__init__()
        self.policy, self.input_size = policy, int(input_size)
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment uint8 [B,3,H,W] (square) on x's device; `generator` makes it reproducible."""
        p, size = self.policy, self.input_size
        x = _to_unit(x)
        # columns: 0 flip, 1 rotate, 2-3 translate, 4 zoom, 5-7 jitter, 8-12 erase, 13-14 perspective,
        # 15-16 blur (apply, sigma), 17 grayscale
        u = draws(x.shape[0], generator, x.device)

        # Colour and blur at source resolution: up to 49x fewer pixels than after the resize.
        if p.color_jitter > 0:
            b, c, s = (1 + p.color_jitter * (2 * u[:, i] - 1) for i in (5, 6, 7))
            x = _jitter(x, b.clamp(min=0), c.clamp(min=0), s.clamp(min=0))
        if p.grayscale_prob > 0:
            x = torch.where((u[:, 17] < p.grayscale_prob).view(-1, 1, 1, 1), _grey(x), x)
        if p.blur_prob > 0:
            lo, hi = p.blur_sigma
            # Radius from the policy, not the drawn sigmas: no device sync, one kernel size.
            radius = max(1, min(math.ceil(3 * hi), x.shape[-1] - 1))
            blurred = _blur(x, lo + (hi - lo) * u[:, 16], radius)
            x = torch.where((u[:, 15] < p.blur_prob).view(-1, 1, 1, 1), blurred, x)

        geometric = (p.max_rotate_deg > 0 or p.max_translate > 0 or tuple(p.zoom) != (1.0, 1.0)
                     or p.perspective > 0)
        if p.flip or geometric:
            flip = torch.where(flipped(u), -1.0, 1.0) if p.flip else torch.ones_like(u[:, 0])
            angle = torch.deg2rad(p.max_rotate_deg * (2 * u[:, 1] - 1))
            # Normalised coordinates span 2, so a shift of fraction t is 2t.
            tx, ty = (2 * p.max_translate * (2 * u[:, i] - 1) for i in (2, 3))
            inv_zoom = 1 / (p.zoom[0] + (p.zoom[1] - p.zoom[0]) * u[:, 4])
            cos, sin = torch.cos(angle) * inv_zoom, torch.sin(angle) * inv_zoom
            # theta maps output -> input coords: rotate . scale . flip(x), then shift.
            theta = torch.stack([torch.stack([flip * cos, -sin, tx], 1),
                                 torch.stack([flip * sin, cos, ty], 1)], 1)
            if p.perspective > 0:
                # H = A @ T: tilt the output plane (T = I with third row (px, py, 1)), then the
                # affine A; H's third row is (px, py, 1) too, so w = 1 + px*x + py*y > 0.
                px, py = (p.perspective * (2 * u[:, i] - 1) for i in (13, 14))
                tilt = torch.eye(3, device=x.device).repeat(x.shape[0], 1, 1)
                tilt[:, 2, 0], tilt[:, 2, 1] = px, py
                bottom = tilt.new_tensor([0.0, 0.0, 1.0]).expand(x.shape[0], 1, 3)
                x = homography_resize(x, torch.cat([theta, bottom], 1) @ tilt, size)
            else:  # the exact affine path (train/eval geometry agree at identity)
                x = affine_resize(x, theta, size)
        elif x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

        x = _normalise(x, self.mean, self.std)
        if p.erase_prob > 0:  # after normalisation, so 0 is the mean colour
            x.masked_fill_(_erase_mask(u[:, 8:13], p, size), 0.0)
        return x


def normalisation_of(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std (0..1 units) the backbone's pretrained weights expect, from timm's config."""
    import timm.data  # lazy: validating a config parses its policy here, and timm takes seconds to import

    cfg = timm.data.resolve_data_config({}, model=model)
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
