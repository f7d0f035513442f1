"""Batched on-device augmentation for uint8 image tensors (airbench style: no PIL, no DataLoader).

The dataset lives on the device as uint8 [N,3,H,W]; every batch is augmented in a few tensor ops
with independent random parameters per image, and resized to the backbone's input size in the
same resampling pass.

`aug_policy(strength)` maps one search knob onto the policy, linearly in between the two ends:

    field            strength 0   strength 1      per image
    flip             on           on              horizontal flip with p=0.5
    max_translate    0            0.125           shift U(-t, t) of image size, per axis
    max_rotate_deg   0            15              angle U(-r, r) degrees
    zoom             (1.0, 1.0)   (0.8, 1.2)      scale U(lo, hi); >1 magnifies
    color_jitter     0            0.4             brightness/contrast/saturation U(1-c, 1+c)
    erase_prob       0            0.25            erase one rectangle with this probability
    erase_area       (0.02, 0.2)  (0.02, 0.2)     fraction of the image; fixed, p carries strength

Strength outside [0, 1] raises ValueError.
"""

from dataclasses import dataclass
import math

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey, as torchvision's rgb_to_grayscale
_ERASE_LOG_RATIO = (math.log(0.3), math.log(3.3))  # torchvision RandomErasing's aspect range
_N_DRAWS = 13  # uniforms per image, see DeviceAugment.forward


@dataclass(frozen=True)
class AugPolicy:
    """What to randomise and how much; see the module docstring for the strength mapping."""

    flip: bool
    max_rotate_deg: float
    max_translate: float  # fraction of image size
    zoom: tuple[float, float]  # content scale range
    color_jitter: float  # amplitude of brightness/contrast/saturation factors
    erase_prob: float
    erase_area: tuple[float, float]  # fraction of the output image


def aug_policy(strength: float) -> AugPolicy:
    """Map strength in [0, 1] linearly from flip-only (0) to the full policy (1)."""
    if not 0.0 <= strength <= 1.0:  # also rejects NaN
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    s = float(strength)
    return AugPolicy(
        flip=True,
        max_rotate_deg=15.0 * s,
        max_translate=0.125 * s,
        zoom=(1.0 - 0.2 * s, 1.0 + 0.2 * s),
        color_jitter=0.4 * s,
        erase_prob=0.25 * s,
        erase_area=(0.02, 0.2),
    )


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel, x in 0..1 units; in place (callers pass a fresh tensor)."""
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
    """Resample float [B,C,H,W] through per-image 2x3 `theta` (output -> input, normalised
    coordinates) to [B,C,size,size] in one bilinear pass.

    Reflection padding: with an identity theta it clamps border samples exactly like
    F.interpolate, so train and eval geometry agree; and shifted/rotated/zoomed-out images get
    mirrored content instead of black bands that would be a cue seen only in training.
    """
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _jitter(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation with per-image factors [B] (torchvision's blends)."""
    luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = (x * b.view(-1, 1, 1, 1)).clamp_(0, 1)
    grey_mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = torch.lerp(grey_mean, x, c.view(-1, 1, 1, 1)).clamp_(0, 1)
    grey = (x * luma).sum(1, keepdim=True)
    return torch.lerp(grey, x, s.view(-1, 1, 1, 1)).clamp_(0, 1)


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
        # One draw for everything, on the generator's device (a CPU generator can drive CUDA
        # data), so the stream does not depend on which parts are switched on.
        dev = generator.device if generator is not None else x.device
        u = torch.rand(x.shape[0], _N_DRAWS, generator=generator, device=dev).to(x.device)

        if p.color_jitter > 0:  # at source resolution: up to 49x fewer pixels than after resize
            b, c, s = (1 + p.color_jitter * (2 * u[:, i] - 1) for i in (5, 6, 7))
            x = _jitter(x, b.clamp(min=0), c.clamp(min=0), s.clamp(min=0))

        geometric = p.max_rotate_deg > 0 or p.max_translate > 0 or tuple(p.zoom) != (1.0, 1.0)
        if p.flip or geometric:
            flip = torch.where(u[:, 0] < 0.5, -1.0, 1.0) if p.flip else torch.ones_like(u[:, 0])
            angle = torch.deg2rad(p.max_rotate_deg * (2 * u[:, 1] - 1))
            # Normalised coordinates span 2, so a shift of fraction t is 2t.
            tx, ty = (2 * p.max_translate * (2 * u[:, i] - 1) for i in (2, 3))
            inv_zoom = 1 / (p.zoom[0] + (p.zoom[1] - p.zoom[0]) * u[:, 4])
            cos, sin = torch.cos(angle) * inv_zoom, torch.sin(angle) * inv_zoom
            # theta maps output -> input coords: rotate . scale . flip(x), then shift.
            theta = torch.stack([torch.stack([flip * cos, -sin, tx], 1),
                                 torch.stack([flip * sin, cos, ty], 1)], 1)
            x = affine_resize(x, theta, size)
        elif x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

        x = _normalise(x, self.mean, self.std)
        if p.erase_prob > 0:  # after normalisation, so 0 is the mean colour
            x.masked_fill_(_erase_mask(u[:, 8:13], p, size), 0.0)
        return x


def normalisation_of(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std (0..1 units) the backbone's pretrained weights expect, from timm's config."""
    import timm.data  # local: keeps this module importable and fast without timm

    cfg = timm.data.resolve_data_config({}, model=model)
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
