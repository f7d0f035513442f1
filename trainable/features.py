"""The frozen-feature cache: a head-only stage trained on the backbone's pooled features, computed once.

With the backbone frozen and nothing random or stateful in it, and the images unaugmented up to a flip,
each step's backbone output is one of two vectors per image (the image's or its mirror's): both are
computed once and the head trains on them with the uncached loop's own random stream (the permutation,
then one `augment.draws` per batch whose flip column picks the view). The files live under
`cache_root()`/features, keyed by weights, input size, precision, layout, device type, images and view,
written atomically under a lock and memory-mapped, so a node's trials share them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from trainable import atomic
from trainable.augment import beyond_flip, draws, eval_transform, flipped, policy_for
from trainable.cache import cache_root
from trainable.config import TrialConfig
from trainable.errors import UserError
from trainable.loop import Precision, evaluate_outputs, halving_batches, train_steps
from trainable.memory import trial_budget
from trainable.model import Net, train_mode
from trainable.stages import Stage

SWITCH_ENV = "CIFAR_TUNE_FEATURE_CACHE"  # "off" turns the cache off; "" or "on" leaves it on
CACHE_SHARE = 0.25  # of a trial's memory budget (memory.trial_budget) its cached features may take
FORMAT = 1  # bump when the file's content changes meaning
DISK_CAP = 8 * 2 ** 30  # bytes of feature files kept on a node; the least recently used go first


def enabled() -> bool:
    """Whether CIFAR_TUNE_FEATURE_CACHE leaves the cache on; UserError on a value it does not know."""
    value = os.environ.get(SWITCH_ENV, "").strip().lower()
    if value not in ("", "on", "off"):
        raise UserError(f"{SWITCH_ENV}={value!r} is not a switch: use on or off, or unset it")
    return value != "off"


def why_not_cached(cfg: TrialConfig, stage: Stage) -> str | None:
    """Why the config's `stage` cannot train on cached features (None: it can, as far as the config tells)."""
    if stage.top_blocks != 0:
        return "it trains backbone blocks"
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        return "mixup/cutmix mix the images"
    if beyond_flip(policy_for(cfg.aug_strength, cfg.augment)):
        return "its augmentation goes beyond a horizontal flip"
    return None


def _why_not_model(net: Net, freeze_bn: bool) -> str | None:
    """Why the backbone, in the stage's train mode, is not a fixed function of its input."""
    train_mode(net, freeze_bn)
    if any(p.requires_grad for p in net.backbone.parameters()):
        return "backbone parameters train"
    if getattr(net.backbone, "drop_rate", 0.0):  # timm applies it to the pooled features in train mode
        return "the backbone drops out its pooled features"
    for name, m in net.backbone.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return f"BatchNorm {name} updates its running statistics"
        rate = m.p if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", 0.0)
        if rate:
            return f"{name} drops out at random"
    return None


class _Head(Net):
    """Net after the backbone's pooling: Net.forward on pooled features [B, D], sharing the heads."""

    def __init__(self, net: Net):
        nn.Module.__init__(self)
        self.backbone = nn.Identity()
        self.coarse_head, self.fine_head = net.coarse_head, net.fine_head


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, (bytes, memoryview)) else repr(p).encode())
    return h.hexdigest()[:32]


def weights_digest(module: nn.Module) -> str:
    """A digest of every parameter and buffer (names, dtypes, shapes, values): the weights' identity."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:32]


def images_digest(images: np.ndarray) -> str:
    """A digest of a split's images (shape and bytes): the data's identity."""
    a = np.ascontiguousarray(images)
    return _digest(a.shape, str(a.dtype), memoryview(a).cast("B"))


@torch.no_grad()  # not inference_mode: the head's backward saves these features
def extract(net: Net, x: torch.Tensor, *, input_size: int, mean, std, prec: Precision, batch_size: int,
            mirror: bool) -> torch.Tensor:
    """The backbone's pooled features [N, D] of uint8 images x resized to `input_size` (mirrored with
    `mirror`), in eval mode and the precision's layout and autocast."""
    net.eval()

    def step(rows: slice) -> torch.Tensor:
        xb = eval_transform(x[rows], input_size, mean, std)
        xb = prec.prepare(xb.flip(-1) if mirror else xb)
        with prec.autocast():
            return net.backbone(xb)
    parts, _ = halving_batches(x.shape[0], batch_size, step, x.device)
    return torch.cat(parts)


def _load_or_build(path: Path, build) -> tuple[torch.Tensor, bool]:
    """(features, built here): the file at `path` memory-mapped, or `build()` saved there under a lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            try:
                feats = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["features"]
                os.utime(path)  # recently used: evicted last
                return feats, False
            except Exception:  # noqa: BLE001 - an unreadable file is rebuilt, not trusted
                pass
        feats = build()
        try:
            atomic.torch_save({"features": feats.cpu(), "format": FORMAT}, path)
            evict(path.parent, DISK_CAP)
        except OSError as e:  # a full or read-only disk: this trial still trains on them
            print(f"feature cache: could not write {path} ({e.strerror}); not shared", flush=True)
        return feats, True


def evict(folder: Path, cap: int) -> list[Path]:
    """Delete the least recently used feature files in `folder` until the rest take at most `cap` bytes;
    returns them. A trial that has one memory-mapped keeps reading it (the kernel frees it later)."""
    files = []
    for f in folder.glob("*.pt"):
        try:
            st = f.stat()
        except FileNotFoundError:  # another trial evicted it meanwhile
            continue
        files.append((st.st_mtime, st.st_size, f))
    files.sort(reverse=True)
    total, gone = 0, []
    for _, size, f in files:
        total += size
        if total > cap:
            f.unlink(missing_ok=True)
            gone.append(f)
    return gone


class CachedStage:
    """A head-only stage on cached features: train_epoch and evaluate as loop's, without the backbone."""

    def __init__(self, net: Net, views: tuple[torch.Tensor, torch.Tensor | None], fine: torch.Tensor,
                 coarse: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                 built: bool, seconds: float, freeze_bn: bool):
        self.net, self.head = net, _Head(net)
        self.plain, self.mirror = views
        self.fine, self.coarse, self.val = fine, coarse, val
        self.status, self.seconds, self.freeze_bn = ("built" if built else "hit"), seconds, freeze_bn

    def train_epoch(self, *, batch_size: int, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, prec: Precision,
                    scaler: torch.amp.GradScaler | None, smoothing: float, coarse_weight: float,
                    generator: torch.Generator) -> dict:
        """loop.train_epoch's epoch on the features; its metrics plus feature_cache (built or hit in the
        stage's first epoch, hit after) and feature_seconds (the time spent getting them)."""
        train_mode(self.net, self.freeze_bn)
        dev = self.fine.device
        perm = torch.randperm(self.plain.shape[0], device=dev, generator=generator)

        def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            u = draws(idx.shape[0], generator, dev)  # the uncached loop's draws, in the same order
            f = self.plain[idx]
            if self.mirror is not None:
                f = torch.where(flipped(u)[:, None], self.mirror[idx], f)
            return f, self.fine[idx], self.coarse[idx]
        out = train_steps(self.head, perm, batch, batch_size=batch_size, opt=opt, sched=sched, prec=prec,
                          scaler=scaler, smoothing=smoothing, coarse_weight=coarse_weight)
        out.update(feature_cache=self.status, feature_seconds=self.seconds)
        self.status, self.seconds = "hit", 0.0
        return out

    def evaluate(self, *, batch_size: int, prec: Precision) -> dict:
        """loop.evaluate's metrics on the validation features."""
        feats, fine, coarse = self.val

        def forward(rows: slice):
            with prec.autocast():
                return self.head(feats[rows])
        return evaluate_outputs(forward, fine, coarse, batch_size=batch_size)


def _no_room(root: Path, n_feats: int, width: int) -> str:
    """Why `n_feats` float32 feature vectors of `width` do not fit in `root` or the trial's memory ('' if they do)."""
    need, budget = n_feats * width * 4, int(CACHE_SHARE * trial_budget(torch.get_num_threads()))
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free if os.access(root, os.W_OK) else 0
    except OSError:
        free = 0
    if not free:
        return f"{root} cannot be written (set CIFAR_TUNE_CACHE to a writable folder)"
    if need <= min(budget, free):
        return ""
    over = (f"the budget of {budget / 2 ** 20:,.0f} MiB ({CACHE_SHARE:.0%} of this trial's share of the node's RAM)"
            if need > budget else f"the {free / 2 ** 20:,.0f} MiB free in {root}")
    return f"its {n_feats} feature vectors need {need / 2 ** 20:,.0f} MiB, over {over}"


def for_stage(cfg: TrialConfig, stage: Stage, net: Net, *, epochs: int, train_images: np.ndarray, x: torch.Tensor,
              fine: torch.Tensor, coarse: torch.Tensor, val_images: np.ndarray | None,
              val: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, mean, std, prec: Precision,
              batch_size: int, log: Callable[[str], None] = lambda m: print(m, flush=True)) -> CachedStage | None:
    """The stage on cached features, or None when it runs uncached: not cacheable, the cache off, the
    features over CACHE_SHARE of the trial's memory (`log` says so), or `epochs` (this run's of the stage)
    below 2 with the features not cached yet: extracting costs about two uncached epochs.
    train_images/val_images (uint8 arrays) key the cache; x/fine/coarse and val are the splits on the device."""
    if not enabled() or why_not_cached(cfg, stage) or _why_not_model(net, cfg.freeze_bn):
        return None
    mirror = policy_for(cfg.aug_strength, cfg.augment).flip
    n_feats = x.shape[0] * (2 if mirror else 1) + (val[0].shape[0] if val is not None else 0)
    width = (net.coarse_head if net.coarse_head is not None else net.fine_head).in_features
    root = cache_root() / "features"
    no_room = _no_room(root, n_feats, width)
    if no_room:
        log(f"feature cache: off for stage {stage.number}: {no_room}; it runs uncached")
        return None
    t0 = time.perf_counter()
    key = (FORMAT, cfg.backbone, weights_digest(net.backbone), cfg.input_size, prec.name, prec.channels_last,
           prec.device.type)
    train_key = images_digest(train_images)
    wanted = [(train_key, x, False)] + ([(train_key, x, True)] if mirror else []) + \
        ([(images_digest(val_images), val[0], False)] if val is not None else [])
    paths = [root / f"{cfg.backbone}-{cfg.input_size}px-{_digest(*key, k, flip)}.pt" for k, _, flip in wanted]
    if epochs < 2 and not all(p.is_file() for p in paths):
        return None
    built = False

    def view(path: Path, xs: torch.Tensor, flip: bool) -> torch.Tensor:
        nonlocal built
        feats, here = _load_or_build(path, lambda: extract(net, xs, input_size=cfg.input_size, mean=mean, std=std,
                                                           prec=prec, batch_size=batch_size, mirror=flip))
        built |= here
        return feats.to(prec.device)
    got = [view(path, xs, flip) for path, (_, xs, flip) in zip(paths, wanted)]
    views = (got[0], got[1] if mirror else None)
    val_c = (got[-1], val[1], val[2]) if val is not None else None
    seconds = time.perf_counter() - t0
    log(f"feature cache: stage {stage.number} trains the head on the frozen backbone's features, "
        f"{'extracted' if built else 'read from the cache'} in {seconds:.1f} s")
    return CachedStage(net, views, fine, coarse, val_c, built, seconds, cfg.freeze_bn)
