"""One trial: a multi-stage fine-tune as a plain function of (config, data, reporter).

Ray Tune calls it in a search (search/tune_trial.py adapts it), analyze.py calls it to retrain the
best config on train+val, and tests call it with a list as the reporter.
"""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trainable import features
from trainable.augment import DeviceAugment, normalisation_of, policy_for
from trainable.config import TrialConfig
from trainable.data import Split, fidelity_subset
from trainable.early_stop import EarlyStop
from trainable.loop import Precision, batching, evaluate, make_mixup, train_epoch
from trainable.memory import is_out_of_memory
from trainable.model import Net, create_model
from trainable.optim import build_optimizer, build_plateau, count_trainable, head_lr
from trainable.stages import plan_stages

# reporter(metrics, checkpoint_dir or None); the directory is only valid during the call
Reporter = Callable[[dict[str, Any], Path | None], None]
CHECKPOINT_FILE = "state.pt"


def pick_device() -> torch.device:
    """Outside Ray (the retrain, gpu_check): the current CUDA device when there is one, else the CPU.

    A search trial does not ask this: search/tune_trial.py decides from the GPUs Ray assigned it
    (a CPU trial may still see every GPU) and passes run_trial its `device`."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def to_device(split: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images and int64 labels on the device, once per trial.

    On the CPU this is a zero-copy view of the (read-only, shared) object-store arrays.
    """
    with warnings.catch_warnings():  # arrays from Ray's object store are read-only; we never write
        warnings.simplefilter("ignore", UserWarning)
        return tuple(torch.from_numpy(np.asarray(a)).to(device) for a in
                     (split.images, split.fine.astype(np.int64, copy=False),
                      split.coarse.astype(np.int64, copy=False)))


def run_trial(config: dict[str, Any], train: Split, val: Split | None, report: Reporter, *,
              restore: Path | None = None, checkpoint: bool = True, stop_after_epoch: int | None = None,
              raise_oom: bool = False, device: torch.device | None = None) -> tuple[Net | None, dict[str, Any]]:
    """Fine-tune through every stage, reporting once per epoch; returns the model and last metrics.

    `restore` is a checkpoint directory written by an earlier call: training continues at the
    epoch after it. With `val` None (the final retrain) only training metrics are reported, so a
    config that trains on val_loss (early stopping, reduce-on-plateau) needs `val`.
    `stop_after_epoch` k ends the trial after global epoch k: the same stage plan and lr schedule
    (built for every planned epoch), cut there. Running out of memory anywhere (setup, training,
    validation, checkpoint) ends the trial with status "oom" and its reason, or re-raises the
    error with `raise_oom` (the caller retries); the model is None when it ran out before one existed.
    `device` is where to train (default pick_device()); config's `precision` says how.
    """
    cfg = TrialConfig.from_dict(config)
    if val is None and cfg.uses_val:
        raise ValueError("early_stop_patience/plateau_patience need a validation split")
    if stop_after_epoch is not None and stop_after_epoch < 1:
        raise ValueError(f"stop_after_epoch must be >= 1, got {stop_after_epoch}")
    at = _Progress()
    try:
        return _train(cfg, train, val, report, restore, checkpoint, stop_after_epoch, at, device)
    except (MemoryError, RuntimeError) as e:
        if raise_oom or not is_out_of_memory(e):
            raise
        reason = at.oom_reason(cfg)
    # out of the except block: the traceback's frames (and their tensors) are released first
    if at.device is not None and at.device.type == "cuda":
        torch.cuda.empty_cache()
    metrics = {**at.metrics, "epoch": at.epoch, "stage": at.stage}
    report(failure_result(metrics, "oom", reason), None)  # retrying cannot help; the search goes on
    return at.net, {**metrics, "status": "oom", "error": reason}


class _Progress:
    """Where a trial is, so an out-of-memory error anywhere in it can say where and what to lower."""

    def __init__(self) -> None:
        self.phase = "setup"  # setup, training, validation, checkpoint
        self.epoch, self.stage = 0, 0  # the 1-based global epoch being worked on, and its stage
        self.net: Net | None = None
        self.device: torch.device | None = None
        self.metrics: dict[str, Any] = {}  # the epoch's metrics so far (training's, when validation fails)

    def oom_reason(self, cfg: TrialConfig) -> str:
        where = {"setup": f"setting up (model {cfg.backbone} and data on {self.device or 'the device'}) "
                          f"before epoch {self.epoch}",
                 "training": f"epoch {self.epoch} while training (batch_size {cfg.batch_size}, "
                             f"input_size {cfg.input_size})",
                 "validation": f"epoch {self.epoch} while validating (down to one image at a time, "
                               f"input_size {cfg.input_size})",
                 "checkpoint": f"epoch {self.epoch} while saving its checkpoint"}[self.phase]
        fix = {"setup": "pick a smaller backbone or fewer images (--subset)",
               "training": "lower batch_size or input_size", "validation": "lower input_size or pick a smaller backbone",
               "checkpoint": "lower batch_size or input_size"}[self.phase]
        return f"out of memory in {where}: {fix}"


def _train(cfg: TrialConfig, train: Split, val: Split | None, report: Reporter, restore: Path | None,
           checkpoint: bool, stop_after_epoch: int | None, at: _Progress,
           device: torch.device | None = None) -> tuple[Net, dict[str, Any]]:
    torch.manual_seed(cfg.seed)
    train = fidelity_subset(train, cfg.train_fraction, cfg.seed)
    device = at.device = device if device is not None else pick_device()
    if device.type == "cuda":  # "cuda" alone, generators and library workspaces mean this GPU
        torch.cuda.set_device(device)
    prec = Precision.for_device(device, cfg.backbone, cfg.precision)
    state = _load(restore, device) if restore is not None else None
    done = state["epoch"] if state else 0  # epochs trained so far, over all stages
    plan = plan_stages(cfg)
    at.epoch, at.stage = done + 1, state["stage"] if state else plan[0].number
    net = at.net = create_model(cfg.backbone, pretrained=cfg.pretrained, weights_dir=cfg.weights_dir,
                                head=cfg.head, small_input_stem=cfg.small_input_stem)
    mean, std = normalisation_of(net.backbone)
    prec.model_to(net)
    model = torch.compile(net) if cfg.compile else net
    x, fine, coarse = to_device(train, device)
    val_t = to_device(val, device) if val is not None else None
    eval_bs = cfg.eval_batch_size  # halved for good if validation runs out of memory (loop.evaluate)

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    mix_gen = torch.Generator().manual_seed(cfg.seed)  # mixup/cutmix draws (loop.mix_batch): on the CPU, no sync
    aug = DeviceAugment(policy_for(cfg.aug_strength, cfg.augment), cfg.input_size, mean, std)
    mix = make_mixup(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.label_smoothing)
    scaler = prec.grad_scaler()  # fp16 only; bf16 and fp32 step the optimiser directly
    _, steps_per_epoch = batching(len(train), cfg.batch_size)

    best = state["best"] if state else {"val_acc": -1.0, "epoch": 0}
    if state:
        net.load_state_dict(state["net"])
        gen.set_state(state["generator"].cpu())
        if state.get("mix_generator") is not None:
            mix_gen.set_state(state["mix_generator"])
        if scaler is not None and state.get("scaler"):  # the loss scale it had learned, not 2**16 again
            scaler.load_state_dict(state["scaler"])
    last = stop_after_epoch or cfg.total_epochs
    metrics: dict[str, Any] = {}
    for s in plan:
        resuming = state is not None and state["stage"] == s.number
        if state is not None and (s.number < state["stage"] or (resuming and state["stage_done"])):
            continue  # finished before the checkpoint
        if done >= last:
            break
        opt, sched = build_optimizer(net, s, cfg, s.epochs * steps_per_epoch, device)
        plateau = build_plateau(opt, cfg)
        stopper = EarlyStop(cfg.early_stop_patience)
        stage_epoch = 0
        if resuming:
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            if plateau is not None:
                plateau.load_state_dict(state["plateau"])
            stopper = EarlyStop.from_state(state["stopper"])
            stage_epoch = state["stage_epoch"]
        cached = features.for_stage(cfg, s, net, epochs=min(s.epochs - stage_epoch, last - done),
                                    train_images=train.images, x=x, fine=fine, coarse=coarse,
                                    val_images=val.images if val is not None else None, val=val_t, mean=mean,
                                    std=std, prec=prec, batch_size=eval_bs)
        while stage_epoch < s.epochs and done < last:
            at.phase, at.epoch, at.stage, at.metrics = "training", done + 1, s.number, {}
            inject_fault(cfg, done + 1, first_run=restore is None)
            if cached is not None:
                tr = cached.train_epoch(batch_size=cfg.batch_size, opt=opt, sched=sched, prec=prec, scaler=scaler,
                                        smoothing=cfg.label_smoothing, coarse_weight=cfg.coarse_loss_weight,
                                        generator=gen)
            else:
                tr = {**train_epoch(model, x, fine, coarse, aug=aug, batch_size=cfg.batch_size, opt=opt,
                                    sched=sched, prec=prec, scaler=scaler, mix=mix,
                                    smoothing=cfg.label_smoothing, coarse_weight=cfg.coarse_loss_weight,
                                    generator=gen, freeze_bn=cfg.freeze_bn, mix_generator=mix_gen),
                      "feature_cache": "off"}
            done, stage_epoch = done + 1, stage_epoch + 1
            metrics = at.metrics = {"epoch": done, "stage": s.number, "lr": head_lr(opt),
                                    "trainable_params": count_trainable(net), **tr}
            if not math.isfinite(tr["train_loss"]):
                # a diverged trial stops at once and is never a candidate for best
                report(failure_result(metrics, "diverged", f"non-finite training loss in epoch {done}"), None)
                return net, {**metrics, "status": "diverged"}
            stopped = False
            if val_t is not None:
                at.phase = "validation"
                ev = cached.evaluate(batch_size=eval_bs, prec=prec) if cached is not None else \
                    evaluate(model, *val_t, input_size=cfg.input_size, mean=mean, std=std, batch_size=eval_bs,
                             prec=prec)
                if ev["batch_size"] < eval_bs:
                    print(f"validation ran out of memory at eval_batch_size {eval_bs}: it goes on at "
                          f"{ev['batch_size']} (the same results, less memory)", flush=True)
                eval_bs = ev.pop("batch_size")
                if ev["acc"] > best["val_acc"]:
                    best = {"val_acc": ev["acc"], "epoch": done}
                metrics.update({f"val_{k}": v for k, v in ev.items()}, best_val_acc=best["val_acc"],
                               best_epoch=best["epoch"])
                if plateau is not None:
                    plateau.step(ev["loss"])
                stopped = stopper.update(ev["loss"]) and stage_epoch < s.epochs
            # early_stopped: this epoch ended its stage early (the trial too, in the last stage)
            metrics.update(diverged=False, status="ok", early_stopped=stopped)
            stage_done = stopped or stage_epoch == s.epochs
            at.phase = "checkpoint"
            if not checkpoint:
                report(metrics, None)
            else:
                with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
                    state_now = {"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                 "plateau": plateau.state_dict() if plateau is not None else None,
                                 "stopper": stopper.state_dict(), "epoch": done, "stage": s.number,
                                 "stage_epoch": stage_epoch, "stage_done": stage_done, "best": best,
                                 "generator": gen.get_state(), "mix_generator": mix_gen.get_state(),
                                 "config": cfg.to_dict(),
                                 "scaler": scaler.state_dict() if scaler is not None else None}
                    torch.save(state_now, Path(tmp) / CHECKPOINT_FILE)  # a private dir: Tune copies it on report
                    report(metrics, Path(tmp))
            if stopped:
                break
    return net, metrics


def failure_result(metrics: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    """The last result of a trial that failed in a way a retry cannot fix (divergence, OOM).

    It scores 0 for ASHA and the searcher, so TPE learns to avoid that region; export never
    picks it (analysis/experiment.py skips non-"ok" rows)."""
    return {**metrics, "val_acc": 0.0, "best_val_acc": 0.0, "diverged": status == "diverged",
            "status": status, "error": reason}


# Test scaffolding, not a hyper-parameter: the tests that cause faults for real set
# CIFAR_TUNE_FAULT=KIND@EPOCH[:KEY=VALUE], e.g. "crash@2" or "oom@2:seed=1": at the start of global
# epoch EPOCH (of the trials whose config has KEY=VALUE) "crash" kills the worker process (once: not
# again after a restart) and "oom" makes an allocation no machine can satisfy. Ray's workers inherit
# the driver's environment.
FAULT_ENV = "CIFAR_TUNE_FAULT"


def inject_fault(cfg: TrialConfig, epoch: int, first_run: bool) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    kind_epoch, _, condition = spec.partition(":")
    kind, _, at = kind_epoch.partition("@")
    if kind not in ("crash", "oom") or not at.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r}: write KIND@EPOCH[:KEY=VALUE], KIND crash or oom")
    if int(at) != epoch:
        return
    if condition:
        key, _, value = condition.partition("=")
        if str(getattr(cfg, key.strip())) != value.strip():
            return
    if kind == "crash" and first_run:
        os._exit(17)  # die like an OOM-killed worker: no exception, no cleanup
    if kind == "oom":
        torch.empty(1 << 60, dtype=torch.uint8)  # a real allocator failure (1 EiB)


def _load(directory: Path, device: torch.device) -> dict:
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location=device, weights_only=True)
