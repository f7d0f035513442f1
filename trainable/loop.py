"""One training epoch and one evaluation pass, over uint8 tensors that already live on the device.

Batches are index slices of the on-device dataset; augmentation, mixup and normalisation happen
batched on the device, in the precision and memory layout `Precision` picks for it.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup

from trainable.augment import DeviceAugment, eval_transform
from trainable.config import PRECISIONS
from trainable.memory import is_out_of_memory
from trainable.model import NUM_COARSE, NUM_FINE, Net, train_mode

# backbones that train slower in channels_last on the CPU (benchmarks/layout.py); none measured so far
CPU_CONTIGUOUS: frozenset[str] = frozenset()
_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_precision(device: torch.device, requested: str = "auto") -> str:
    """fp32, bf16 or fp16 on `device`; `requested` other than "auto" wins. "auto": fp32 on the CPU, bf16
    where the GPU has it natively (ROCm, compute capability 8.0+), else fp16 with a GradScaler (V100, T4).
    (torch.cuda.is_bf16_supported() counts emulated bf16 too, and asks the current device.)"""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "fp32"
    return "bf16" if _native_bf16(device) else "fp16"


def _native_bf16(device: torch.device) -> bool:
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)


@dataclass
class Precision:
    """How the forward pass runs on this device."""
    device: torch.device
    amp_dtype: torch.dtype | None  # None = fp32
    channels_last: bool

    @classmethod
    def for_device(cls, device: torch.device, backbone: str = "", precision: str = "auto") -> "Precision":
        """choose_precision's pick, in channels_last but for CPU_CONTIGUOUS backbones: oneDNN's CPU convolutions
        are NHWC-native (lite0 trains 2-3.8x faster here, benchmarks/layout.py), as are cuDNN's fp16/bf16 ones."""
        name = choose_precision(device, precision)
        if name == "bf16" and device.type == "cuda" and not _native_bf16(device):
            warnings.warn(f"precision bf16 on {torch.cuda.get_device_name(device)} (compute capability "
                          f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}) is emulated: "
                          f"slow; fp16 (precision auto) is this GPU's fast mixed precision", stacklevel=2)
        channels_last = device.type == "cuda" or backbone not in CPU_CONTIGUOUS
        return cls(device, _AMP_DTYPES[name], channels_last)

    @property
    def name(self) -> str:
        return {dtype: name for name, dtype in _AMP_DTYPES.items()}[self.amp_dtype]

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling against gradient underflow; bf16 (fp32's exponent range) and fp32 do not."""
        return torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

    def model_to(self, net: torch.nn.Module) -> torch.nn.Module:
        """Move the model to the device in this precision's memory layout."""
        return net.to(self.device, memory_format=torch.channels_last if self.channels_last
                      else torch.preserve_format)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else contextlib.nullcontext()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def make_mixup(mixup_alpha: float, cutmix_alpha: float, smoothing: float) -> Mixup | None:
    """timm's Mixup (batch mode: one lambda per batch) over the fine classes; None when both are off."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=smoothing,
                 num_classes=NUM_FINE, mode="batch")


def coarse_matrix(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """(NUM_FINE, NUM_COARSE) 0/1 matrix, 1 where the fine class belongs to the superclass (a fine class
    absent from the labelled data belongs to none)."""
    table = _fine_to_coarse(fine, coarse)
    return F.one_hot(table.clamp(min=0), NUM_COARSE).float() * (table >= 0)[:, None]


def mix_batch(mix: Mixup, x: torch.Tensor, fine: torch.Tensor, fine_to_coarse: torch.Tensor,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed images, soft fine targets (B, NUM_FINE), soft coarse targets (B, NUM_COARSE)).

    timm draws lambda and the cutmix box from numpy's global RNG: seeded from the trial's own CPU
    `generator` (in its checkpoint), a resumed run continues identically. The coarse target is the
    fine one times the fine-to-coarse matrix, exact because mixing and label smoothing are linear
    (each CIFAR-100 superclass holds 5 fine classes: smoothing over 100 sums to smoothing over 20)."""
    np.random.seed(int(torch.randint(2**31 - 1, (), generator=generator)))
    x, soft_fine = mix(x, fine)
    soft_coarse = soft_fine @ fine_to_coarse
    return x, soft_fine, soft_coarse / soft_coarse.sum(1, keepdim=True).clamp_min(1e-12)


def _loss(out, fine, coarse, smoothing: float, coarse_weight: float):
    """Cross-entropy over hard targets (long) or soft ones (mixup's float rows); plus the coarse
    head's, weighted, when the model has one."""
    fine_logits, coarse_logits = out if isinstance(out, tuple) else (out, None)
    smoothing = 0.0 if fine.is_floating_point() else smoothing  # soft targets already carry it
    loss = F.cross_entropy(fine_logits, fine, label_smoothing=smoothing)
    if coarse_logits is not None:
        loss = loss + coarse_weight * F.cross_entropy(coarse_logits, coarse, label_smoothing=smoothing)
    return loss


def batching(n: int, batch_size: int) -> tuple[int, int]:
    """(batch size, optimiser steps) of an epoch over `n` images: an even batch (mixup pairs each image with
    its mirror) of at most `batch_size`, the ragged last one dropped; fewer images than a batch train as one."""
    bs = max(2, min(batch_size, n - n % 2))
    return bs, max(1, n // bs)


def make_batch(x: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor, idx: torch.Tensor, *,
               aug: DeviceAugment, prec: Precision, generator: torch.Generator, mix: Mixup | None = None,
               fine_to_coarse: torch.Tensor | None = None, mix_generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `idx` rows of the on-device uint8 images, augmented, mixed when `mix` is given (mix_batch), in the
    precision's layout: (images float (B, 3, S, S), fine targets, coarse targets: indices, or soft rows under mixup)."""
    xb, yb, cb = aug(x[idx], generator), fine[idx], coarse[idx]
    if mix is not None:
        xb, yb, cb = mix_batch(mix, xb, yb, fine_to_coarse, mix_generator)
    return prec.prepare(xb), yb, cb


def train_epoch(net: Net, x: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor, *,
                aug: DeviceAugment, batch_size: int, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, prec: Precision,
                scaler: torch.amp.GradScaler | None, mix: Mixup | None, smoothing: float,
                coarse_weight: float, generator: torch.Generator, freeze_bn: bool = False,
                mix_generator: torch.Generator | None = None) -> dict:
    """One pass over (x, fine, coarse) in random order (train_steps' metrics); `mix_generator`: the CPU
    generator of mixup/cutmix's draws, given with `mix`."""
    train_mode(net, freeze_bn)
    perm = torch.randperm(x.shape[0], device=x.device, generator=generator)
    batch = partial(make_batch, x, fine, coarse, aug=aug, prec=prec, generator=generator, mix=mix,
                    fine_to_coarse=coarse_matrix(fine, coarse) if mix is not None else None, mix_generator=mix_generator)
    return train_steps(net, perm, batch, batch_size=batch_size, opt=opt, sched=sched, prec=prec, scaler=scaler,
                       smoothing=smoothing, coarse_weight=coarse_weight)


def train_steps(net: torch.nn.Module, perm: torch.Tensor,
                batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *,
                batch_size: int, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                prec: Precision, scaler: torch.amp.GradScaler | None, smoothing: float,
                coarse_weight: float) -> dict:
    """Optimiser steps over the rows in `perm`'s order, cut as `batching` cuts them; `batch(rows)` gives (input,
    fine targets, coarse targets). Returns train_loss, images_per_sec and train_seconds (the steps' own clock)."""
    bs, steps = batching(perm.shape[0], batch_size)
    total = torch.zeros((), device=perm.device)
    _sync(prec.device)
    t0 = time.perf_counter()
    for i in range(steps):
        xb, yb, cb = batch(perm[i * bs:(i + 1) * bs])
        with prec.autocast():
            loss = _loss(net(xb), yb, cb, smoothing, coarse_weight)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        total += loss.detach().float()
    _sync(prec.device)
    seconds = time.perf_counter() - t0
    return {"train_loss": float(total) / max(1, steps),
            "images_per_sec": steps * bs / max(seconds, 1e-9), "train_seconds": seconds}


T = TypeVar("T")


def halving_batches(n: int, batch_size: int, step: Callable[[slice], T], device: torch.device | None = None
                    ) -> tuple[list[T], int]:
    """`step(rows)` over rows [0, n) in slices of `batch_size`, a slice that runs out of memory retried at
    half its size and the rest at that size (inference only: results must not depend on the split).
    Returns the results in row order and the size to start at next time; raises when one row does not fit."""
    out: list[T] = []
    i, bs = 0, max(1, batch_size)
    while i < n:
        j = min(n, i + bs)
        try:
            out.append(step(slice(i, j)))
            i = j
            continue
        except (MemoryError, RuntimeError) as e:
            if j - i == 1 or not is_out_of_memory(e):
                raise
        # out of the except block: the failed slice's tensors (held by the traceback) are freed first
        bs = (j - i) // 2
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()
    return out, bs


@torch.inference_mode()
def evaluate(net: Net, x: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor, *,
             input_size: int, mean, std, batch_size: int, prec: Precision,
             return_predictions: bool = False) -> dict:
    """Loss, top-1, top-5 and superclass accuracy (of the fine prediction: comparable across heads), the calibrated
    loss ("cal_loss": the loss at the softmax temperature that fits these images best, Ashukha et al., ICLR 2020: how
    well models predict, compared apart from how confident they are, which label smoothing and mixup lower), with a
    coarse-to-fine head also its coarse head's loss and accuracy, of uint8 x [N, 3, H, W] on the device.
    Batches that run out of memory are halved: "batch_size" in the result is the size that worked."""
    net.eval()

    def forward(rows: slice):
        xb = prec.prepare(eval_transform(x[rows], input_size, mean, std))
        with prec.autocast():
            return net(xb)
    return evaluate_outputs(forward, fine, coarse, batch_size=batch_size, return_predictions=return_predictions)


# softmax temperatures for the calibrated loss: 0.05 to 20 in steps of x1.26 (27 cross-entropies a batch: cheap
# beside the forward pass)
TEMPERATURES = torch.logspace(-1.3, 1.3, 27).tolist()


@torch.inference_mode()
def evaluate_outputs(forward: Callable[[slice], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
                     fine: torch.Tensor, coarse: torch.Tensor, *, batch_size: int,
                     return_predictions: bool = False) -> dict:
    """`evaluate`'s metrics from `forward(rows)`: the model's logits (or (fine, coarse) logits) for those rows."""
    fine_to_coarse = _fine_to_coarse(fine, coarse)

    def step(rows: slice) -> dict[str, torch.Tensor]:
        yb, cb = fine[rows], coarse[rows]
        out = forward(rows)
        logits = (out[0] if isinstance(out, tuple) else out).float()
        pred = logits.argmax(1)
        got = {"loss": F.cross_entropy(logits, yb, reduction="sum"), "acc": (pred == yb).sum(),
               "top5": (logits.topk(5, dim=1).indices == yb[:, None]).any(1).sum(),
               "loss_by_t": torch.stack([F.cross_entropy(logits / t, yb, reduction="sum") for t in TEMPERATURES]),
               "coarse_acc": (fine_to_coarse[pred] == cb).sum(), "pred": pred}
        if isinstance(out, tuple):
            coarse_logits = out[1].float()
            got.update(coarse_head_loss=F.cross_entropy(coarse_logits, cb, reduction="sum"),
                       coarse_head_acc=(coarse_logits.argmax(1) == cb).sum())
        return got

    parts, used = halving_batches(fine.shape[0], batch_size, step, fine.device)
    n = max(1, fine.shape[0])
    keys = parts[0].keys() if parts else ("loss", "acc", "top5", "coarse_acc")
    result = {k: float(sum(p[k] for p in parts)) / n for k in keys if k not in ("pred", "loss_by_t")}
    if parts:  # the loss at the temperature that fits these images best: a grid point within 12 % of the optimum
        result["cal_loss"] = float(sum(p["loss_by_t"] for p in parts).min()) / n
    if return_predictions:  # "pred": a batch's few int64s, kept either way
        preds = [p["pred"] for p in parts]
        result["predictions"] = torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.long)
    result["batch_size"] = used
    return result


def _fine_to_coarse(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """The superclass of each fine class, read off the labelled data (-1 where unseen)."""
    table = torch.full((NUM_FINE,), -1, dtype=torch.long, device=fine.device)
    table[fine] = coarse
    return table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
