"""In-process measurements (no Ray): the bare training loop, the augmentation pipeline, the
torchvision DataLoader baseline and the per-stage step cost.

The pipeline, DataLoader and stage comparisons are timed side by side: the contenders run in
alternating rounds in the same process with the same torch thread count, so load from other
processes on the machine hits them alike. Rates are total images over total seconds across the
rounds. The bare loop also runs as a process of its own (`python benchmarks/micro.py ...`), to be
compared with a trial's worker process.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trainable.augment import DeviceAugment, aug_policy, eval_transform, normalisation_of
from trainable.config import TrialConfig
from trainable.data import Split
from trainable.loop import Precision, make_mixup
from trainable.model import Net, create_model, set_trainable, train_mode
from trainable.optim import build_optimizer
from trainable.stages import Stage

BACKBONE = "tf_efficientnet_lite0"
MIXUP_ALPHA, CUTMIX_ALPHA, SMOOTHING = 0.8, 1.0, 0.1  # timm's defaults for the mixup part


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextlib.contextmanager
def threads(n: int):
    """torch intra-op threads for the block, restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def interleave(contenders: dict[str, Callable[[], int]], rounds: int, dev: torch.device,
               tick: Callable[[], None] = lambda: None,
               setups: dict[str, Callable[[], None]] | None = None,
               warmup: bool = True) -> dict[str, dict]:
    """Run each contender once per round, in turn; returns images/s per contender.

    A contender does a unit of work and returns how many images it processed; its optional
    setup (untimed) runs right before each call. With `warmup`, one untimed call of each comes
    first (allocator warm-up, lazy init); without, the caller has warmed them up itself.
    Returns {name: {"rate", "seconds", "images", "round_rates"}}.
    """
    setups = setups or {}
    for name, fn in contenders.items():
        if not warmup:
            break
        setups.get(name, lambda: None)()
        fn()
        sync(dev)
    out = {k: {"seconds": 0.0, "images": 0, "round_rates": []} for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            setups.get(name, lambda: None)()
            sync(dev)
            t0 = time.perf_counter()
            n = fn()
            sync(dev)
            dt = time.perf_counter() - t0
            out[name]["seconds"] += dt
            out[name]["images"] += n
            out[name]["round_rates"].append(n / max(dt, 1e-9))
            tick()
    for v in out.values():
        v["rate"] = v["images"] / max(v["seconds"], 1e-9)
    return out


# ----------------------------------------------------------------------------- shared pieces


@dataclass
class Bench:
    """The model, data and normalisation every in-process measurement shares."""
    net: Net
    x: torch.Tensor  # uint8 [N,3,32,32] on the device
    fine: torch.Tensor
    coarse: torch.Tensor
    mean: tuple
    std: tuple
    dev: torch.device
    prec: Precision


def make_bench(train: Split, weights_dir: str, channels_last: bool | None = None) -> Bench:
    """The benchmark's model and data on the device; `channels_last` None = the trial's layout
    (loop.Precision.for_device), True/False forces one."""
    dev = device()
    net = create_model(BACKBONE, pretrained=bool(weights_dir), weights_dir=weights_dir)
    mean, std = normalisation_of(net.backbone)
    prec = Precision.for_device(dev, BACKBONE)
    if channels_last is not None:
        prec = Precision(prec.device, prec.amp_dtype, channels_last)
    prec.model_to(net)
    x = torch.from_numpy(np.ascontiguousarray(train.images)).to(dev)
    fine = torch.from_numpy(train.fine.astype(np.int64)).to(dev)
    coarse = torch.from_numpy(train.coarse.astype(np.int64)).to(dev)
    return Bench(net, x, fine, coarse, mean, std, dev, prec)


def _model_step(b: Bench, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
                sched=None) -> None:
    """forward + loss + backward + optimiser step, as the trial's loop does it (no data work)."""
    with b.prec.autocast():
        out = b.net(xb)
        loss = F.cross_entropy(out if not isinstance(out, tuple) else out[0], yb,
                               label_smoothing=SMOOTHING)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()


def _fixed_batch(b: Bench, size: int, bs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented, normalised batch at `size`, made once and reused by the model-only timings."""
    g = torch.Generator(device=b.dev).manual_seed(seed)
    idx = torch.randperm(b.x.shape[0], device=b.dev, generator=g)[:bs]
    aug = DeviceAugment(aug_policy(1.0), size, b.mean, b.std)
    return b.prec.prepare(aug(b.x[idx], g)), b.fine[idx]


# ----------------------------------------------------------------------------- 1. bare loop


class BareLoop:
    """A bare PyTorch loop: the same network, images, batch and input size as the trial, all
    layers trainable, SGD (Nesterov, momentum 0.9, wd 5e-4), label-smoothed CE; per batch only
    slice -> float -> resize -> normalise (no augmentation, no mixup, no lr schedule), then an
    evaluation pass over the same validation images under inference_mode. No Ray, no reporting,
    no checkpoint.
    """

    def __init__(self, b: Bench, *, input_size: int, batch_size: int, val: Split,
                 eval_batch_size: int = 512, lr: float = 3e-3, seed: int = 0):
        self.b, self.input_size, self.eval_batch_size, self.val = b, input_size, eval_batch_size, val
        set_trainable(b.net, None)
        train_mode(b.net)
        self.opt = torch.optim.SGD(b.net.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                   weight_decay=5e-4)
        self.g = torch.Generator(device=b.dev).manual_seed(seed)
        n = b.x.shape[0]
        self.bs = min(batch_size, n - n % 2)
        self.steps = n // self.bs
        self.xv = torch.from_numpy(np.ascontiguousarray(val.images)).to(b.dev)
        self.m = torch.tensor(b.mean, device=b.dev).view(1, 3, 1, 1)
        self.s = torch.tensor(b.std, device=b.dev).view(1, 3, 1, 1)

    def _batch(self, idx: torch.Tensor) -> torch.Tensor:
        xb = self.b.x[idx].float().div_(255)
        if self.input_size != xb.shape[-1]:
            xb = F.interpolate(xb, size=(self.input_size,) * 2, mode="bilinear", align_corners=False)
        return self.b.prec.prepare((xb - self.m) / self.s)

    def warmup(self, steps: int = 10) -> None:
        """Untimed steps: the allocator settles over the first few (the trial's timed stage-2
        epochs likewise follow a whole stage-1 epoch)."""
        n = self.b.x.shape[0]
        perm = torch.randperm(n, device=self.b.dev, generator=self.g)
        for i in range(steps):
            idx = perm[(i * self.bs) % (n - self.bs + 1):][:self.bs]
            _model_step(self.b, self.opt, self._batch(idx), self.b.fine[idx])

    def epoch(self) -> dict:
        """One timed epoch; `start`/`end` are time.time() stamps, to line it up with other work."""
        b, dev = self.b, self.b.dev
        b.net.train()
        perm = torch.randperm(b.x.shape[0], device=dev, generator=self.g)
        sync(dev)
        start, t0 = time.time(), time.perf_counter()
        for i in range(self.steps):
            idx = perm[i * self.bs:(i + 1) * self.bs]
            _model_step(b, self.opt, self._batch(idx), b.fine[idx])
        sync(dev)
        t1 = time.perf_counter()
        b.net.eval()
        with torch.inference_mode():
            for i in range(0, self.xv.shape[0], self.eval_batch_size):
                xb = b.prec.prepare(eval_transform(self.xv[i:i + self.eval_batch_size],
                                                   self.input_size, b.mean, b.std))
                with b.prec.autocast():
                    b.net(xb).argmax(1)
        sync(dev)
        t2 = time.perf_counter()
        return {"images": self.steps * self.bs, "train_seconds": t1 - t0, "eval_seconds": t2 - t1,
                "start": start, "end": start + (t2 - t0)}


def bare_epochs(b: Bench, *, epochs: int, warmup_steps: int = 10,
                thread_counts: tuple[int, ...] = (), **kw) -> list[dict]:
    """`epochs` timed BareLoop epochs after `warmup_steps` untimed steps. With `thread_counts`,
    each epoch runs once at every count in turn (1, 2, 1, 2, ...: load drift hits them alike),
    each count warmed up first; every row records its `threads`."""
    loop = BareLoop(b, **kw)
    counts = tuple(thread_counts) or (torch.get_num_threads(),)
    for t in counts:
        with threads(t):
            loop.warmup(warmup_steps)
    rows = []
    for _ in range(epochs):
        for t in counts:
            with threads(t):
                rows.append({**loop.epoch(), "threads": t})
    return rows


# ----------------------------------------------------------------------------- 2 + 3. pipelines


def pipeline_fn(b: Bench, size: int, bs: int, batches: int, seed: int = 1) -> Callable[[], int]:
    """The trial's per-batch data work: random index slice of the on-device uint8 set,
    DeviceAugment at aug_strength 1 (resize+flip+rotate+translate+zoom, jitter, erasing,
    normalisation) and timm Mixup/CutMix; `batches` batches per call."""
    aug = DeviceAugment(aug_policy(1.0), size, b.mean, b.std)
    mix = make_mixup(MIXUP_ALPHA, CUTMIX_ALPHA, SMOOTHING)
    g = torch.Generator(device=b.dev).manual_seed(seed)
    n = b.x.shape[0]

    def run() -> int:
        perm = torch.randperm(n, device=b.dev, generator=g)
        for i in range(batches):
            idx = perm[(i * bs) % (n - bs + 1):][:bs]
            xb, yb = mix(aug(b.x[idx], g), b.fine[idx])
            b.prec.prepare(xb)
        return batches * bs
    return run


def model_fn(b: Bench, size: int, bs: int, steps: int = 1) -> Callable[[], int]:
    """forward + backward + SGD step of the whole network (all layers trainable) on a fixed batch."""
    set_trainable(b.net, None)
    train_mode(b.net)
    opt = torch.optim.SGD(b.net.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
    xb, yb = _fixed_batch(b, size, bs)

    def run() -> int:
        for _ in range(steps):
            _model_step(b, opt, xb, yb)
        return steps * bs
    return run


def headroom(b: Bench, size: int, bs: int, rounds: int, pipe_batches: int, model_steps: int = 1,
             tick=lambda: None) -> dict:
    """Pipeline images/s over model-training images/s at one input size, interleaved."""
    r = interleave({"pipeline": pipeline_fn(b, size, bs, pipe_batches),
                    "model": model_fn(b, size, bs, model_steps)}, rounds, b.dev, tick)
    return {"size": size, "batch_size": bs, "pipeline": r["pipeline"], "model": r["model"],
            "ratio": r["pipeline"]["rate"] / r["model"]["rate"]}


class _PILSet(torch.utils.data.Dataset):
    """torchvision's CIFAR pattern: HWC uint8 numpy rows, one PIL image per __getitem__."""

    def __init__(self, images_chw: np.ndarray, labels: np.ndarray, transform):
        self.data = np.ascontiguousarray(images_chw.transpose(0, 2, 3, 1))
        self.labels = labels.astype(np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.data[i])), int(self.labels[i])


def torchvision_transform(size: int, mean, std):
    """The usual per-image recipe, at aug_strength 1's amplitudes, cheapest order for PIL
    (geometry and colour at 32 px, then one resize to `size`)."""
    from torchvision import transforms as T
    return T.Compose([
        T.RandomHorizontalFlip(),
        T.RandomAffine(15, translate=(0.125, 0.125), scale=(0.8, 1.2),
                       interpolation=T.InterpolationMode.BILINEAR),
        T.ColorJitter(0.4, 0.4, 0.4),
        T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.ToTensor(),
        T.Normalize(mean, std),
        T.RandomErasing(p=0.25, scale=(0.02, 0.2), ratio=(0.3, 3.3), value=0),
    ])


def dataloader_fn(train: Split, size: int, bs: int, batches: int, workers: int, mean, std,
                  dev: torch.device, seed: int = 2) -> Callable[[], int]:
    """A fresh DataLoader iterator per call (workers start, as at every epoch without
    persistent_workers), `batches` batches of PIL transforms + default collate, then timm Mixup
    on the batch in the main process; batches moved to the device."""
    ds = _PILSet(train.images, train.fine, torchvision_transform(size, mean, std))
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True,
                                         num_workers=workers, generator=g,
                                         pin_memory=dev.type == "cuda")
    mix = make_mixup(MIXUP_ALPHA, CUTMIX_ALPHA, SMOOTHING)
    need = batches * bs
    if need > len(ds):
        raise ValueError(f"the DataLoader baseline needs {need} images, the set has {len(ds)}")

    def run() -> int:
        it = iter(loader)
        for _ in range(batches):
            xb, yb = next(it)
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            mix(xb, yb)
        del it  # shuts the workers down: nothing runs in the background of the next timing
        return batches * bs
    return run


def vs_dataloader(b: Bench, train: Split, size: int, bs: int, rounds: int, batches: int,
                  workers: int, tick=lambda: None) -> dict:
    r = interleave({"ours": pipeline_fn(b, size, bs, batches),
                    "dataloader": dataloader_fn(train, size, bs, batches, workers, b.mean, b.std, b.dev)},
                   rounds, b.dev, tick)
    return {"size": size, "batch_size": bs, "workers": workers, "ours": r["ours"],
            "dataloader": r["dataloader"], "ratio": r["ours"]["rate"] / r["dataloader"]["rate"]}


# ----------------------------------------------------------------------------- 6. stage cost


def _bn_state(net: Net) -> torch.Tensor:
    return torch.cat([m.running_mean.detach().flatten().clone() for m in net.backbone.modules()
                      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)])


def stage_cost(b: Bench, size: int, bs: int, rounds: int, steps: int, tick=lambda: None) -> dict:
    """Step time (forward+backward+optimiser+schedule step, data excluded) of stage 1 (head only,
    backbone frozen), stage 2 (head + top `unfreeze_depth` blocks, TrialConfig's default) and all
    layers trainable, with the trial's own optimiser and param groups (trainable/optim.py).

    Also checks that stage 1 really stops at the head: no backbone parameter gets a gradient and
    the frozen BatchNorm running statistics do not move.
    """
    cfg = TrialConfig()
    xb, yb = _fixed_batch(b, size, bs, seed=3)
    stages = {"stage 1 (head only)": Stage(1, 0, 1, cfg.stage1_lr, 0),
              f"stage 2 (top {cfg.unfreeze_depth} blocks)": Stage(2, 1, 1, cfg.stage2_lr, cfg.unfreeze_depth),
              "all trainable": Stage(3, 2, 1, cfg.stage3_lr, None, cfg.layer_decay)}

    def contender(stage: Stage):
        state = {}

        def setup() -> None:  # untimed: switch the network to this stage
            state["opt"], state["sched"] = build_optimizer(b.net, stage, cfg, 10_000, b.dev)
            train_mode(b.net)

        def run() -> int:
            for _ in range(steps):
                _model_step(b, state["opt"], xb, yb, state["sched"])
            return steps * bs
        return setup, run

    # the stage-1 checks, on a clean slate
    b.net.zero_grad(set_to_none=True)
    opt, sched = build_optimizer(b.net, stages["stage 1 (head only)"], cfg, 10, b.dev)
    train_mode(b.net)
    before = _bn_state(b.net)
    _model_step(b, opt, xb, yb, sched)
    backbone_grads = sum(p.grad is not None for p in b.net.backbone.parameters())
    bn_moved = not torch.equal(before, _bn_state(b.net))
    head_grads = sum(p.grad is not None for p in b.net.head_parameters())

    pairs = {k: contender(s) for k, s in stages.items()}
    r = interleave({k: p[1] for k, p in pairs.items()}, rounds, b.dev, tick,
                   setups={k: p[0] for k, p in pairs.items()})
    names = list(stages)
    step_ms = {k: 1000 * r[k]["seconds"] / (r[k]["images"] / bs) for k in names}
    set_trainable(b.net, None)
    return {"size": size, "batch_size": bs, "step_ms": step_ms, "names": names,
            "stage1_over_stage2": step_ms[names[0]] / step_ms[names[1]],
            "stage1_over_all": step_ms[names[0]] / step_ms[names[2]],
            "stage2_over_all": step_ms[names[1]] / step_ms[names[2]],
            "stage1_backbone_params_with_grad": backbone_grads,
            "stage1_head_params_with_grad": head_grads,
            "stage1_bn_stats_moved": bn_moved,
            "backbone_params": sum(1 for _ in b.net.backbone.parameters())}



# ----------------------------------------------------------------------------- the bare loop as a process


def bare_process_main(argv: list[str] | None = None) -> int:
    """`python benchmarks/micro.py --data-dir D --subset K ... --epochs N --out FILE`: the bare loop
    as a process of its own, started like a trial worker (own session, OMP_NUM_THREADS set before
    torch loads): load, warm up, run N timed epochs, write one JSON row per epoch to FILE.
    `--threads 1,2` runs each epoch at every listed torch thread count in turn; `--layout`
    forces channels_last or contiguous (default: the trial's choice)."""
    import argparse
    import json
    import os
    from pathlib import Path

    from trainable.data import prepare_search_data
    p = argparse.ArgumentParser()
    for a in ("--data-dir", "--weights-dir", "--out", "--threads"):
        p.add_argument(a, default="")
    p.add_argument("--layout", choices=("trial", "channels_last", "contiguous"), default="trial")
    for a in ("--subset", "--input-size", "--batch-size", "--seed", "--epochs"):
        p.add_argument(a, type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    data = prepare_search_data(a.data_dir, subset=a.subset, val_fraction=0.1, seed=a.seed, download=False)
    layout = {"trial": None, "channels_last": True, "contiguous": False}[a.layout]
    counts = tuple(int(t) for t in a.threads.split(",") if t.strip())
    b = make_bench(data.train, a.weights_dir, layout)
    rows = bare_epochs(b, epochs=a.epochs, input_size=a.input_size, batch_size=a.batch_size,
                       val=data.val, seed=a.seed, thread_counts=counts)
    for r in rows:
        r["layout"] = "channels_last" if b.prec.channels_last else "contiguous"
    Path(a.out).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(bare_process_main())
