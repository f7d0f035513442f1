"""The GPU-scale space: five backbones, 2 or 3 stages, 96-224 px, the full recipe toolbox (flat or
coarse-to-fine head, discriminative lrs, three schedules, reduce-on-plateau, mixup/cutmix)."""
from spaces import Options, Space, Suggest, split_budget


def sample(s: Suggest, o: Options) -> dict:
    stages = s.cat("stages", [2, 3]) if o.max_epochs >= 3 else 2  # 3 stages need 3 epochs
    v = {"backbone": s.cat("backbone", o.backbones), "stages": stages,
         **split_budget(s, o, stages, stage1_max=max(1, o.max_epochs // 4)),
         "unfreeze_depth": s.int("unfreeze_depth", 1, 4),
         "input_size": s.cat("input_size", [96, 128, 160, 224]),
         "batch_size": s.cat("batch_size", [64, 128, 256]),
         "optimizer": s.cat("optimizer", ["sgd", "adamw"]),
         "schedule": (schedule := s.cat("schedule", ["cosine", "onecycle", "constant"])),
         "stage1_lr": s.float("stage1_lr", 1e-4, 1e-1, log=True),
         "stage2_lr": s.float("stage2_lr", 1e-5, 3e-2, log=True),
         "weight_decay": s.float("weight_decay", 1e-5, 5e-2, log=True),
         "label_smoothing": s.float("label_smoothing", 0.0, 0.2),
         "aug_strength": s.float("aug_strength", 0.0, 1.0),
         "mixup_alpha": s.float("mixup_alpha", 0.0, 0.8),
         "cutmix_alpha": s.float("cutmix_alpha", 0.0, 1.0),
         "head": s.cat("head", ["flat", "coarse_to_fine"]),
         "freeze_bn": s.cat("freeze_bn", [False, True]),
         "backbone_lr_scale": s.float("backbone_lr_scale", 0.05, 1.0, log=True),
         "layer_decay": s.float("layer_decay", 0.5, 1.0)}
    if schedule == "constant":  # a flat lr needs a way down: cut it when val_loss stalls
        v["plateau_patience"] = s.int("plateau_patience", 1, 4)
    if stages == 3:
        v["stage3_lr"] = s.float("stage3_lr", 1e-5, 1e-2, log=True)
    return v


SPACE = Space(
    name="default",
    description="GPU-scale: mobilenetv2/resnet18/resnet50/efficientnet-lite0/efficientnetv2-s, 96-224 px, 30 epochs",
    backbones=("mobilenetv2_100", "resnet50", "tf_efficientnetv2_s", "resnet18", "tf_efficientnet_lite0"),
    max_epochs=30, min_epochs=2, sample=sample)
