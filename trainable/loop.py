"""One training epoch and one evaluation pass, over uint8 tensors that already live on the device.

Batches are index slices of the on-device dataset; augmentation, mixup and normalisation happen
batched on the device. CUDA gets autocast (bf16 where supported, else fp16 with a GradScaler); the
CPU runs fp32. Both run the model in channels_last, the faster layout on each (benchmarks/layout.py).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from trainable.augment import DeviceAugment, eval_transform
from trainable.model import NUM_COARSE, NUM_FINE, Net, train_mode


# backbones that train slower in channels_last on the CPU (benchmarks/layout.py); none measured so far
CPU_CONTIGUOUS: frozenset[str] = frozenset()


@dataclass
class Precision:
    """How the forward pass runs on this device."""
    device: torch.device
    amp_dtype: torch.dtype | None  # None = fp32
    channels_last: bool

    @classmethod
    def for_device(cls, device: torch.device, backbone: str = "") -> "Precision":
        """fp32 on the CPU, autocast on CUDA; channels_last wherever it is the faster layout.

        On this project's 2-core CPU, channels_last trains tf_efficientnet_lite0 2-3.8x faster
        and runs mobilenetv2/resnet18 forward passes 1.25-1.8x faster (issue 14's table;
        `python benchmarks/layout.py` measures any backbone): oneDNN's convolutions are
        NHWC-native. CPU_CONTIGUOUS lists backbones measured slower that way.
        """
        if device.type != "cuda":
            return cls(device, None, backbone not in CPU_CONTIGUOUS)
        bf16 = torch.cuda.is_bf16_supported()
        return cls(device, torch.bfloat16 if bf16 else torch.float16, True)

    def model_to(self, net: torch.nn.Module) -> torch.nn.Module:
        """Move the model to the device in this precision's memory layout."""
        return net.to(self.device, memory_format=torch.channels_last if self.channels_last
                      else torch.preserve_format)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class _Mixup(Mixup):
    """timm's Mixup, remembering the batch's lambda so the coarse targets can be mixed alike."""
    last_lam: float = 1.0

    def _mix_batch(self, x):
        self.last_lam = super()._mix_batch(x)
        return self.last_lam


def make_mixup(mixup_alpha: float, cutmix_alpha: float, smoothing: float) -> _Mixup | None:
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return _Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=smoothing,
                  num_classes=NUM_FINE, mode="batch")


def _loss(out, fine, coarse, mix: _Mixup | None, smoothing: float, coarse_weight: float):
    fine_logits, coarse_logits = out if isinstance(out, tuple) else (out, None)
    if mix is None:
        loss = F.cross_entropy(fine_logits, fine, label_smoothing=smoothing)
        if coarse_logits is not None:
            loss = loss + coarse_weight * F.cross_entropy(coarse_logits, coarse, label_smoothing=smoothing)
        return loss
    soft = SoftTargetCrossEntropy()
    loss = soft(fine_logits, fine)  # `fine` is already the mixed soft target here
    if coarse_logits is not None:
        from timm.data.mixup import mixup_target
        loss = loss + coarse_weight * soft(coarse_logits, mixup_target(coarse, NUM_COARSE, mix.last_lam, smoothing))
    return loss


def train_epoch(net: Net, x: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor, *,
                aug: DeviceAugment, batch_size: int, opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler, prec: Precision,
                scaler: torch.amp.GradScaler | None, mix: _Mixup | None, smoothing: float,
                coarse_weight: float, generator: torch.Generator, freeze_bn: bool = False) -> dict:
    """One pass over (x, fine, coarse) in random order; returns train_loss and images_per_sec."""
    train_mode(net, freeze_bn)
    n = x.shape[0]
    bs = min(batch_size, n - n % 2)  # mixup needs an even batch; a tiny subset still trains
    perm = torch.randperm(n, device=x.device, generator=generator)
    total = torch.zeros((), device=x.device)
    steps = n // bs  # drop the ragged last batch: keeps batch statistics and step count stable
    _sync(prec.device)
    t0 = time.perf_counter()
    for i in range(steps):
        idx = perm[i * bs:(i + 1) * bs]
        xb, yb, cb = aug(x[idx], generator), fine[idx], coarse[idx]
        if mix is not None:
            xb, yb = mix(xb, yb)
        xb = prec.prepare(xb)
        with prec.autocast():
            loss = _loss(net(xb), yb, cb, mix, smoothing, coarse_weight)
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


@torch.inference_mode()
def evaluate(net: Net, x: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor, *,
             input_size: int, mean, std, batch_size: int, prec: Precision,
             return_predictions: bool = False) -> dict:
    """Loss, top-1, top-5 and superclass accuracy (the fine prediction's superclass is right: comparable
    across heads); with a coarse-to-fine head also the coarse head's own loss and accuracy."""
    net.eval()
    zero = lambda dtype=torch.long: torch.zeros((), device=x.device, dtype=dtype)  # noqa: E731
    loss, coarse_loss = zero(torch.float32), zero(torch.float32)
    correct, top5, coarse_ok, coarse_head_ok = zero(), zero(), zero(), zero()
    fine_to_coarse = _fine_to_coarse(fine, coarse)
    preds, has_coarse_head = [], False
    for i in range(0, x.shape[0], batch_size):
        xb = prec.prepare(eval_transform(x[i:i + batch_size], input_size, mean, std))
        yb, cb = fine[i:i + batch_size], coarse[i:i + batch_size]
        with prec.autocast():
            out = net(xb)
        logits = (out[0] if isinstance(out, tuple) else out).float()
        loss += F.cross_entropy(logits, yb, reduction="sum")
        pred = logits.argmax(1)
        correct += (pred == yb).sum()
        top5 += (logits.topk(5, dim=1).indices == yb[:, None]).any(1).sum()
        coarse_ok += (fine_to_coarse[pred] == cb).sum()
        if isinstance(out, tuple):
            has_coarse_head = True
            coarse_logits = out[1].float()
            coarse_loss += F.cross_entropy(coarse_logits, cb, reduction="sum")
            coarse_head_ok += (coarse_logits.argmax(1) == cb).sum()
        if return_predictions:
            preds.append(pred)
    n = max(1, x.shape[0])
    result = {"loss": float(loss) / n, "acc": float(correct) / n, "top5": float(top5) / n,
              "coarse_acc": float(coarse_ok) / n}
    if has_coarse_head:
        result.update(coarse_head_loss=float(coarse_loss) / n, coarse_head_acc=float(coarse_head_ok) / n)
    if return_predictions:
        result["predictions"] = torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.long)
    return result


def _fine_to_coarse(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """The superclass of each fine class, read off the labelled data (-1 where unseen)."""
    table = torch.full((NUM_FINE,), -1, dtype=torch.long, device=fine.device)
    table[fine] = coarse
    return table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
