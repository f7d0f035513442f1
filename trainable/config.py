"""TrialConfig: every hyper-parameter of one fine-tune, defined once.

The search spaces (spaces/), the exported best config and analyze.py's retrain all speak in these
field names; nothing else lists them. A field's docstring-style comment is its documentation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args, get_type_hints

from trainable.errors import UserError

# the values each choice allows, declared once: validate() and the tuples below derive from them
Head = Literal["flat", "coarse_to_fine"]
Optimizer = Literal["sgd", "adamw", "rmsprop"]
Schedule = Literal["cosine", "onecycle", "constant", "step"]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
HEADS, OPTIMIZERS, SCHEDULES, PRECISIONS = (get_args(t) for t in (Head, Optimizer, Schedule, PrecisionName))
_BOOLS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}
# the fields that say how a trial runs, not what it learns: never tuned, never shown as hyper-parameters
RUN_FIELDS = frozenset({"weights_dir", "seed", "compile", "eval_batch_size", "precision", "train_fraction"})


@dataclass
class TrialConfig:
    # --- model
    backbone: str = "tf_efficientnet_lite0"  # timm model name
    pretrained: bool = True  # ImageNet weights (hub, or weights_dir/<backbone>.pth)
    weights_dir: str = ""  # offline weights folder; "" = the hub
    small_input_stem: bool = False  # 32 px from scratch: ResNet gets a 3x3/1 stem, no max-pool; VGG a pooled linear head
    head: Head = "flat"  # "flat" (100 classes) or "coarse_to_fine" (20-superclass logits feed the fine head)
    coarse_loss_weight: float = 0.3  # weight of the coarse head's loss (coarse_to_fine)
    # --- stage plan (trainable/stages.py): head, then top blocks, then everything; 0 epochs skip a stage
    unfreeze_depth: int = 2  # stage 2 trains the top `unfreeze_depth` backbone blocks + head
    stage1_epochs: int = 1
    stage1_lr: float = 1e-2
    stage2_epochs: int = 2
    stage2_lr: float = 3e-3
    stage3_epochs: int = 0
    stage3_lr: float = 1e-3
    backbone_lr_scale: float = 1.0  # the top unfrozen block's lr relative to the stage's (head's) lr
    layer_decay: float = 0.75  # stages 2-3: each block's lr is layer_decay times the block above's
    freeze_bn: bool = False  # keep every BatchNorm's statistics fixed, also in unfrozen blocks
    schedule: Schedule = "cosine"  # per stage: "cosine" (warmup + cosine), "onecycle", "constant" (warmup + flat) or "step" (warmup, then x0.1 at 30/60/90 %: BiT)
    warmup_frac: float = 0.1  # fraction of each stage spent warming up
    plateau_patience: int = 0  # constant schedule: lr *= plateau_factor after this many epochs without a lower val_loss; 0 = off
    plateau_factor: float = 0.1
    early_stop_patience: int = 0  # end a stage after this many epochs without a lower val_loss; 0 = off
    # --- optimiser and loss
    optimizer: Optimizer = "sgd"  # "sgd" (Nesterov, momentum 0.9), "adamw" or "rmsprop" (TF-style, timm RMSpropTF)
    weight_decay: float = 5e-4
    batch_size: int = 128
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # timm Mixup; 0 = off
    cutmix_alpha: float = 0.0  # timm Mixup; 0 = off
    # --- input
    input_size: int = 32  # images are upsampled from 32 px to this on the device
    aug_strength: float = 0.5  # 0: flip only .. 1: every op at full strength (trainable/augment.py)
    augment: str = ""  # explicit op list overriding aug_strength, e.g. "flip,rotate=15,blur=0.1"
    # --- run
    seed: int = 0
    compile: bool = False  # torch.compile the model (worth it for long GPU trials only)
    precision: PrecisionName = "auto"  # auto (bf16 on GPUs with compute capability 8.0+, fp16 + GradScaler on older ones, fp32 on the CPU), fp32, bf16 or fp16 (bf16/fp16 also on the CPU)
    eval_batch_size: int = 512
    # fidelity: train on this stratified share of the train split, the whole stage plan kept (a
    # data subset keeps stage 2 that fewer epochs would cut off: FABOLAS, Klein et al. 2017)
    train_fraction: float = 1.0

    @property
    def uses_val(self) -> bool:
        """Training itself reads val_loss (early stopping, reduce-on-plateau), not only reports it."""
        return self.early_stop_patience > 0 or self.plateau_patience > 0

    @property
    def total_epochs(self) -> int:
        return self.stage1_epochs + self.stage2_epochs + self.stage3_epochs

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialConfig":
        """Build from a (possibly partial) dict; unknown keys are an error, values are coerced."""
        cfg = cls(**coerce(d))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        checks = [
            (self.unfreeze_depth >= 1, "unfreeze_depth must be >= 1"),
            (min(self.stage1_epochs, self.stage2_epochs, self.stage3_epochs) >= 0, "stage epochs must be >= 0"),
            (self.total_epochs >= 1, "the stage plan has no epochs: give some stage epochs >= 1"),
            (self.backbone_lr_scale > 0, "backbone_lr_scale must be > 0"),
            (all(lr > 0 for lr in (self.stage1_lr, self.stage2_lr, self.stage3_lr)), "learning rates must be > 0"),
            (0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]"),
            (self.plateau_patience >= 0 and self.early_stop_patience >= 0, "patiences must be >= 0 (0 = off)"),
            (0 < self.plateau_factor < 1, "plateau_factor must be in (0, 1)"),
            (self.plateau_patience == 0 or self.schedule == "constant",
             "plateau_patience needs schedule=constant (cosine and onecycle decay the lr themselves)"),
            # a training batch of 1 gives BatchNorm one value per channel at a 1x1 feature map
            (self.batch_size >= 2, f"batch_size {self.batch_size} is too small (BatchNorm can't train on one image): use 2 or more"),
            (self.eval_batch_size >= 1, f"eval_batch_size {self.eval_batch_size} must be >= 1"),
            (self.weight_decay >= 0 and self.coarse_loss_weight >= 0, "weight_decay and coarse_loss_weight must be >= 0"),
            (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup_alpha and cutmix_alpha must be >= 0"),
            # timm Mixup pairs each image with its mirror in the batch (asserts an even size)
            (self.batch_size % 2 == 0 or (self.mixup_alpha <= 0 and self.cutmix_alpha <= 0),
             f"mixup/cutmix need an even batch_size: use {max(2, self.batch_size - 1)} or "
             f"{self.batch_size + 1}, not {self.batch_size}"),
            (16 <= self.input_size <= 512, "input_size must be in [16, 512]"),
            (0.0 <= self.aug_strength <= 1.0, "aug_strength must be in [0, 1]"),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (0.0 <= self.warmup_frac < 1.0, "warmup_frac must be in [0, 1)"),
            (0.0 < self.train_fraction <= 1.0, "train_fraction must be in (0, 1]"),
            (self.seed >= 0, "seed must be >= 0 (numpy's generators refuse a negative one)"),
        ]
        checks += [(getattr(self, name) in get_args(t), f"{name} must be one of {', '.join(get_args(t))}")
                   for name, t in get_type_hints(TrialConfig).items() if getattr(t, "__origin__", None) is Literal]
        # inf passes every range check above that has no upper end (a learning rate of 1e400 is inf)
        checks[:0] = [(math.isfinite(v), f"{k} must be a finite number, not {v}") for k, v in vars(self).items()
                      if isinstance(v, float)]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"bad trial config: {msg}")
        from trainable.augment import policy_for  # lazy: the CLIs import this module before torch
        try:
            policy_for(self.aug_strength, self.augment)
        except ValueError as e:
            raise UserError(f"bad trial config: {e}") from None


def split_assignment(item: str, form: str = "KEY=VALUE") -> tuple[str, str]:
    """A --set item "key = value" -> ("key", "value"); UserError when it has no "=" or no key."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r} is not {form}: write e.g. --set batch_size=256")
    return key.strip(), value.strip()


def coerce(d: dict[str, Any]) -> dict[str, Any]:
    """`d` with each value converted to its TrialConfig field's type by as_type (no range checks); UserError for
    unknown keys and values that do not convert."""
    if not isinstance(d, dict):
        raise UserError(f"a trial config is a mapping of hyper-parameter: value, not a {type(d).__name__}")
    types = {f.name: type(f.default) for f in fields(TrialConfig)}
    unknown = sorted(str(k) for k in set(d) - set(types))
    if unknown:
        raise UserError(f"unknown hyper-parameter(s) {', '.join(unknown)}: "
                        f"valid ones are the fields of TrialConfig in trainable/config.py")
    out = {}
    for k, v in d.items():
        try:
            out[k] = as_type(types[k], v)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"hyper-parameter {k}={v!r} is not a valid {types[k].__name__}") from None
    return out


def as_type(typ: type, v: Any) -> Any:
    """`v` as `typ` ("256" -> 256, "true" -> True, 3.0 -> 3); TypeError or ValueError for None, 2.5 for an int..."""
    if v is None:
        raise TypeError("None")
    if typ is bool and isinstance(v, str):
        if v.lower() not in _BOOLS:
            raise ValueError(v)
        return _BOOLS[v.lower()]
    if typ is int and isinstance(v, float) and not v.is_integer():
        raise ValueError(v)  # int(2.5) would silently be 2
    return typ(v)
