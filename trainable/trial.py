"""One trial: a multi-stage fine-tune as a plain function of (config, data, reporter), which Ray Tune
(search/tune_trial.py), analyze.py's retrain and the tests (a list as the reporter) all call.

Top to bottom: `run_trial` turns out-of-memory into a result; `_train` restores the `Checkpoint` and walks
the stage plan; `_run_stage` runs a stage epoch by epoch; `_save` reports each epoch with its checkpoint.
"""
from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from timm.data import Mixup
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from trainable import features
from trainable.augment import DeviceAugment, normalisation_of, policy_for
from trainable.config import TrialConfig
from trainable.data import Split, fidelity_subset
from trainable.loop import Precision, batching, evaluate, make_mixup, train_epoch
from trainable.memory import is_out_of_memory
from trainable.model import Net, create_model
from trainable.optim import build_optimizer, build_plateau, count_trainable, cut_lr, head_lr
from trainable.stages import Stage, plan_stages

# reporter(metrics, checkpoint_dir or None); the directory is only valid during the call
Reporter = Callable[[dict[str, Any], Path | None], None]
CHECKPOINT_FILE = "state.pt"
SCRATCH_PREFIX = ".checkpoint-"  # a checkpoint being reported (run_trial's `scratch`); left there only by a kill
Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 images, fine labels, coarse labels


def run_trial(config: dict[str, Any], train: Split, val: Split | None, report: Reporter, *,
              restore: Path | None = None, checkpoint: bool = True, stop_after_epoch: int | None = None,
              raise_oom: bool = False, device: torch.device | None = None,
              replay: Replay | None = None, scratch: Path | None = None) -> tuple[Net | None, dict[str, Any]]:
    """Fine-tune through every stage, reporting once per epoch; returns the model and the last metrics reported.

    `restore`: a checkpoint directory an earlier call reported, to go on after. With `val` None (the final
    retrain) only training metrics are reported, so early stopping and reduce-on-plateau need `val` or `replay`,
    the decisions they made at each epoch of a search trial of the same config, made again at the same epochs.
    `stop_after_epoch` k ends after global epoch k of the same plan and schedule. Out of memory anywhere
    ends the trial with status "oom" and its reason (the model None if none existed yet), or re-raises
    with `raise_oom` (the caller retries). `device`: where to train (default pick_device()). `scratch`: the folder
    each epoch's checkpoint is written in until `report` returns (default the system's temp folder); a process
    killed during the call leaves it there, so a search passes the trial's own folder, not /tmp.
    """
    cfg = TrialConfig.from_dict(config)
    if val is None and cfg.uses_val and replay is None:
        raise ValueError("early_stop_patience/plateau_patience need a validation split or a replay")
    if stop_after_epoch is not None and stop_after_epoch < 1:
        raise ValueError(f"stop_after_epoch must be >= 1, got {stop_after_epoch}")
    at = Progress()
    try:
        save = (scratch or Path(tempfile.gettempdir())) if checkpoint else None
        return _train(cfg, train, val, report, at, restore=restore, save=save,
                      last=stop_after_epoch or cfg.total_epochs, device=device, replay=replay)
    except (MemoryError, RuntimeError) as e:
        if raise_oom or not is_out_of_memory(e):
            raise
        reason = at.oom_reason(cfg)
    # out of the except block: the traceback's frames (and their tensors) are released first
    if at.device is not None and at.device.type == "cuda":
        torch.cuda.empty_cache()
    failed = failure_result({**at.metrics, "epoch": at.epoch, "stage": at.stage}, "oom", reason)
    report(failed, None)  # retrying cannot help; the search goes on
    return at.net, failed


def _train(cfg: TrialConfig, train: Split, val: Split | None, report: Reporter, at: Progress, *,
           restore: Path | None, save: Path | None, last: int, device: torch.device | None,
           replay: Replay | None) -> tuple[Net, dict[str, Any]]:
    """Restore the checkpoint, then run the stages it has not finished up to global epoch `last`."""
    device = at.device = device if device is not None else pick_device()
    if device.type == "cuda":  # "cuda" alone, generators and library workspaces mean this GPU
        torch.cuda.set_device(device)
    ckpt = Checkpoint.load(restore, device) if restore is not None else Checkpoint()
    plan = plan_stages(cfg)
    at.epoch, at.stage = ckpt.epoch + 1, ckpt.stage or plan[0].number
    t = _setup(cfg, train, val, device, at)
    t.replay = replay if val is None else None
    ckpt.restore(t)
    metrics: dict[str, Any] = {}
    for s in plan:
        if s.number < ckpt.stage or (s.number == ckpt.stage and ckpt.stage_done):
            continue  # finished before the checkpoint
        if ckpt.epoch >= last:
            break
        metrics = _run_stage(t, s, ckpt, last, report, save)
        if metrics["status"] != "ok":
            break
    return t.net, metrics


def _run_stage(t: Setup, s: Stage, ckpt: Checkpoint, last: int, report: Reporter,
               save: Path | None) -> dict[str, Any]:
    """Train stage `s` from where `ckpt` left it to its end, its early stop or global epoch `last`,
    reporting (and saving `ckpt` in a folder under `save`, if given) after every epoch; returns the last
    metrics reported."""
    cfg, at = t.cfg, t.at
    _, steps = batching(len(t.train), cfg.batch_size)
    opt, sched = build_optimizer(t.net, s, cfg, s.epochs * steps, t.prec.device)
    plateau = build_plateau(opt, cfg)
    stopper = ckpt.enter_stage(s, opt, sched, plateau, cfg.early_stop_patience)
    cached = features.for_stage(cfg, s, t.net, epochs=min(s.epochs - ckpt.stage_epoch, last - ckpt.epoch),
                                train_images=t.train.images, x=t.data[0], fine=t.data[1], coarse=t.data[2],
                                val_images=t.val.images if t.val is not None else None, val=t.val_data,
                                mean=t.aug.mean, std=t.aug.std, prec=t.prec, batch_size=t.eval_bs)
    metrics: dict[str, Any] = {}
    while not ckpt.stage_done and ckpt.epoch < last:
        at.phase, at.epoch, at.stage, at.metrics = "training", ckpt.epoch + 1, s.number, {}
        tr = fit_epoch(t, opt, sched, cached)
        ckpt.epoch, ckpt.stage_epoch = ckpt.epoch + 1, ckpt.stage_epoch + 1
        metrics = at.metrics = {"epoch": ckpt.epoch, "stage": s.number, "lr": head_lr(opt),
                                "trainable_params": count_trainable(t.net), **tr}
        if not math.isfinite(tr["train_loss"]):  # it stops at once and is never a candidate for best
            metrics = failure_result(metrics, "diverged", f"non-finite training loss in epoch {ckpt.epoch}")
            report(metrics, None)
            return metrics
        stopped = False
        if t.val_data is not None:
            at.phase = "validation"
            ev = validate(t, cached)
            if ev["acc"] > ckpt.best["val_acc"]:
                ckpt.best = {"val_acc": ev["acc"], "epoch": ckpt.epoch}
            metrics.update({f"val_{k}": v for k, v in ev.items()}, best_val_acc=ckpt.best["val_acc"],
                           best_epoch=ckpt.best["epoch"])
            if plateau is not None:
                before = head_lr(opt)
                plateau.step(ev["loss"])
                metrics["lr_cut"] = head_lr(opt) < before  # what a retrain without val replays
            stopped = stopper.update(ev["loss"]) and ckpt.stage_epoch < s.epochs
        elif t.replay is not None:  # the retrain on train + val: the search trial's decisions, epoch for epoch
            if ckpt.epoch in t.replay.lr_cuts:
                cut_lr(opt, cfg.plateau_factor)
            stopped = ckpt.epoch in t.replay.early_stops and ckpt.stage_epoch < s.epochs
        # early_stopped: this epoch ended its stage early (the trial too, in the last stage)
        metrics.update(status="ok", early_stopped=stopped)
        ckpt.stage_done = stopped or ckpt.stage_epoch == s.epochs
        at.phase = "checkpoint"
        _save(report, metrics, ckpt.capture(t, opt, sched, plateau, stopper) if save else None, save)
    return metrics


def fit_epoch(t: Setup, opt: Optimizer, sched: LRScheduler, cached: features.CachedStage | None) -> dict[str, Any]:
    """One training epoch, on the stage's cached features when it has them, else on the augmented images."""
    cfg = t.cfg
    kw = dict(batch_size=cfg.batch_size, opt=opt, sched=sched, prec=t.prec, scaler=t.scaler,
              smoothing=cfg.label_smoothing, coarse_weight=cfg.coarse_loss_weight, generator=t.gen)
    if cached is not None:
        return cached.train_epoch(**kw)
    return {**train_epoch(t.model, *t.data, aug=t.aug, mix=t.mix, freeze_bn=cfg.freeze_bn,
                          mix_generator=t.mix_gen, **kw), "feature_cache": "off"}


def validate(t: Setup, cached: features.CachedStage | None) -> dict[str, Any]:
    """The epoch's validation metrics (loop.evaluate's); a batch size that ran out of memory is not tried again."""
    if cached is not None:
        ev = cached.evaluate(batch_size=t.eval_bs, prec=t.prec)
    else:
        ev = evaluate(t.model, *t.val_data, input_size=t.cfg.input_size, mean=t.aug.mean, std=t.aug.std,
                      batch_size=t.eval_bs, prec=t.prec)
    if ev["batch_size"] < t.eval_bs:
        print(f"validation ran out of memory at eval_batch_size {t.eval_bs}: it goes on at "
              f"{ev['batch_size']} (the same results, less memory)", flush=True)
    t.eval_bs = ev.pop("batch_size")
    return ev


def _save(report: Reporter, metrics: dict[str, Any], ckpt: Checkpoint | None, scratch: Path | None) -> None:
    """Report the epoch, with its checkpoint written to a private folder under `scratch` (Tune copies it during
    the call)."""
    if ckpt is None or scratch is None:
        report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=scratch) as tmp:
        ckpt.save(Path(tmp))
        report(metrics, Path(tmp))


@dataclass
class Checkpoint:
    """Where a trial is and every state it needs to go on from there; saved after each epoch."""
    epoch: int = 0  # epochs trained, over all stages
    stage: int = 0  # the stage of the last epoch trained (0: none yet)
    stage_epoch: int = 0  # epochs trained in that stage
    stage_done: bool = False  # that stage ran its course or stopped early
    best: dict[str, float] = field(default_factory=lambda: {"val_acc": -1.0, "epoch": 0})
    # the trial's states (None until the first save) ...
    net: dict | None = None
    generator: torch.Tensor | None = None
    mix_generator: torch.Tensor | None = None
    scaler: dict | None = None  # fp16's GradScaler: the loss scale it had learned, not 2**16 again
    # ... and the stage's
    opt: dict | None = None
    sched: dict | None = None
    plateau: dict | None = None
    stopper: dict | None = None
    config: dict[str, Any] | None = None  # for a reader of the checkpoint alone

    def capture(self, t: Setup, opt: Optimizer, sched: LRScheduler, plateau: ReduceLROnPlateau | None,
                stopper: EarlyStop) -> Checkpoint:
        """This position with the current states of the trial `t` and of its stage."""
        return replace(self, net=t.net.state_dict(), generator=t.gen.get_state(), mix_generator=t.mix_gen.get_state(),
                       scaler=t.scaler.state_dict() if t.scaler is not None else None, opt=opt.state_dict(),
                       sched=sched.state_dict(), plateau=plateau.state_dict() if plateau is not None else None,
                       stopper=asdict(stopper), config=t.cfg.to_dict())

    def restore(self, t: Setup) -> None:
        """Put the trial's saved model, random generators and loss scale back (none for a fresh trial)."""
        if self.net is None:
            return
        t.net.load_state_dict(self.net)
        t.gen.set_state(self.generator.cpu())
        t.mix_gen.set_state(self.mix_generator.cpu())
        if t.scaler is not None and self.scaler is not None:  # None: saved on a device without fp16
            t.scaler.load_state_dict(self.scaler)

    def enter_stage(self, s: Stage, opt: Optimizer, sched: LRScheduler,
                    plateau: ReduceLROnPlateau | None, patience: int) -> EarlyStop:
        """The stage's early stop; saved within stage `s`, its optimiser, schedule and plateau go on too."""
        if self.stage != s.number:
            self.stage, self.stage_epoch, self.stage_done = s.number, 0, False
            return EarlyStop(patience)
        opt.load_state_dict(self.opt)
        sched.load_state_dict(self.sched)
        if plateau is not None:
            plateau.load_state_dict(self.plateau)
        return EarlyStop(**self.stopper)

    def save(self, directory: Path) -> None:
        torch.save(vars(self), directory / CHECKPOINT_FILE)

    @classmethod
    def load(cls, directory: Path, device: torch.device) -> Checkpoint:
        return cls(**torch.load(Path(directory) / CHECKPOINT_FILE, map_location=device, weights_only=True))


@dataclass(frozen=True)
class Replay:
    """What a trial's val_loss decided in the search, by global epoch: reduce-on-plateau cut the lr after
    `lr_cuts`, early stopping ended a stage after `early_stops`. The retrain on train + val, which has no
    val to watch, makes the same decisions at the same epochs (Keras-style: refit on all the data for the
    epochs early stopping chose), so every config retrains on the same images."""
    lr_cuts: frozenset[int] = frozenset()
    early_stops: frozenset[int] = frozenset()

    @classmethod
    def of(cls, results: list[dict[str, Any]]) -> Replay:
        """From a trial's reported epochs (run_trial's metrics)."""
        return cls(frozenset(int(r["epoch"]) for r in results if r.get("lr_cut")),
                   frozenset(int(r["epoch"]) for r in results if r.get("early_stopped")))


@dataclass
class EarlyStop:
    """Ends a stage after `patience` epochs without a new val_loss low (0: never): each stage is a fit of
    its own, independent of ASHA. (torch has no early stopping; Tune's stoppers end the whole trial.)"""
    patience: int
    min_delta: float = 1e-4  # a smaller improvement does not count (Keras's min_delta)
    best: float = math.inf
    bad_epochs: int = 0

    def update(self, val_loss: float) -> bool:
        """Record one epoch's val_loss; True when the stage should end now."""
        if val_loss < self.best - self.min_delta:
            self.best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
        return self.patience > 0 and self.bad_epochs >= self.patience


@dataclass
class Setup:
    """A trial set up on its device: what each of its stages and epochs uses."""
    cfg: TrialConfig
    at: Progress
    net: Net
    model: torch.nn.Module  # net, or its torch.compile'd form
    prec: Precision
    train: Split  # the uint8 arrays (the feature cache keys on them) ...
    val: Split | None
    data: Tensors  # ... and the same on the device
    val_data: Tensors | None
    aug: DeviceAugment  # its mean and std normalise every input the net sees
    mix: Mixup | None
    scaler: torch.amp.GradScaler | None  # fp16 only; bf16 and fp32 step the optimiser directly
    gen: torch.Generator  # shuffling and augmentation, on the device
    mix_gen: torch.Generator  # mixup/cutmix draws (loop.mix_batch): on the CPU, no sync
    eval_bs: int  # halved for good when validation runs out of memory (loop.evaluate)
    replay: Replay | None = None  # without val: the search trial's plateau cuts and early stops


def _setup(cfg: TrialConfig, train: Split, val: Split | None, device: torch.device, at: Progress) -> Setup:
    """The trial's model, data on the device, augmentation and random generators, from its seed."""
    torch.manual_seed(cfg.seed)
    train = fidelity_subset(train, cfg.train_fraction, cfg.seed)
    prec = Precision.for_device(device, cfg.backbone, cfg.precision)
    net = at.net = create_model(cfg.backbone, pretrained=cfg.pretrained, weights_dir=cfg.weights_dir,
                                head=cfg.head, small_input_stem=cfg.small_input_stem)
    prec.model_to(net)
    return Setup(cfg=cfg, at=at, net=net, model=torch.compile(net) if cfg.compile else net, prec=prec,
                 train=train, val=val, data=to_device(train, device),
                 val_data=to_device(val, device) if val is not None else None,
                 aug=DeviceAugment(policy_for(cfg.aug_strength, cfg.augment), cfg.input_size, *normalisation_of(net.backbone)),
                 mix=make_mixup(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.label_smoothing), scaler=prec.grad_scaler(),
                 gen=torch.Generator(device=device).manual_seed(cfg.seed), mix_gen=torch.Generator().manual_seed(cfg.seed),
                 eval_bs=cfg.eval_batch_size)


@dataclass
class Progress:
    """Where a trial is, so an out-of-memory error anywhere in it can say where and what to lower."""
    phase: str = "setup"  # setup, training, validation, checkpoint
    epoch: int = 0  # the 1-based global epoch being worked on ...
    stage: int = 0  # ... and its stage
    net: Net | None = None
    device: torch.device | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # the epoch's so far (training's, when validation fails)

    def oom_reason(self, cfg: TrialConfig) -> str:
        where, fix = {
            "setup": (f"setting up (model {cfg.backbone} and data on {self.device or 'the device'}) before epoch "
                      f"{self.epoch}", "pick a smaller backbone or fewer images (--subset)"),
            "training": (f"epoch {self.epoch} while training (batch_size {cfg.batch_size}, input_size "
                         f"{cfg.input_size})", "lower batch_size or input_size"),
            "validation": (f"epoch {self.epoch} while validating (down to one image at a time, input_size "
                           f"{cfg.input_size})", "lower input_size or pick a smaller backbone"),
            "checkpoint": (f"epoch {self.epoch} while saving its checkpoint", "lower batch_size or input_size"),
        }[self.phase]
        return f"out of memory in {where}: {fix}"


def failure_result(metrics: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    """The last result of a trial that failed in a way a retry cannot fix (divergence, OOM): it scores
    0 for ASHA and the searcher, so TPE learns to avoid that region; export never picks it."""
    return {**metrics, "val_acc": 0.0, "best_val_acc": 0.0, "status": status, "error": reason}


def pick_device() -> torch.device:
    """Outside Ray (the retrain, gpu_check): the current CUDA device when there is one, else the CPU.
    A search trial gets its `device` from search/tune_trial.py, from the GPUs Ray assigned it."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def to_device(split: Split, device: torch.device) -> Tensors:
    """uint8 images and int64 labels on the device, once per trial (on the CPU, a zero-copy view)."""
    with warnings.catch_warnings():  # arrays from Ray's object store are read-only; we never write
        warnings.simplefilter("ignore", UserWarning)
        return tuple(torch.from_numpy(np.asarray(a)).to(device) for a in
                     (split.images, split.fine.astype(np.int64, copy=False),
                      split.coarse.astype(np.int64, copy=False)))
