"""The fine-tuning search space of the GPU (`default`) and CPU (`cpu`) spaces: stage plans from a frozen
extractor (stage 1 alone) through progressive unfreezing to all trainable (stage 3 alone), so every
pretrained recipe is a point of it (spaces/warm_start.py). Conditional parameters are asked only where
they take effect.
"""
from spaces import Options, Suggest, stage_count

INPUT_SIZES = [64, 96, 128, 160, 224]
WEIGHT_DECAYS = [0.0, 1e-5, 1e-4, 5e-4, 1e-3]  # categorical: the recipes' 0 has no log scale


def stage1_cap(max_epochs: int) -> int:
    """The longest head-only stage 1 of a plan that goes on to unfreeze blocks: half the budget (as
    mobilenetv2_2phase_96's 10 of 20). ASHA's first rung comes after it (search/searcher.py)."""
    return max(1, max_epochs // 2)


def sample_finetune(s: Suggest, o: Options) -> dict:
    """Sample one fine-tune over `o.max_epochs` epochs (every plan uses exactly all of them)."""
    m, cap = o.max_epochs, stage1_cap(o.max_epochs)
    stages = stage_count(s, max_epochs=m)
    if stages == 3:  # stage 3 (everything) gets >= 1 epoch; stages 1 and 2 may be skipped.
        # A stage --set fixes keeps its epochs: stage 3 draws only from what they leave
        f1, f2 = (s.fixed.get(f"stage{k}_epochs") for k in (1, 2))
        e3 = s.int("stage3_epochs", 1, m - int(f1 or 0) - int(f2 or 0))
        if f2 is None:
            e1 = s.int("stage1_epochs", 0, min(cap, m - e3))
            e2 = m - e1 - e3
        else:
            e2, e1 = int(f2), int(f1) if f1 is not None else m - e3 - int(f2)
    else:  # stage 1 up to the cap then stage 2 (0 epochs: stage 1 alone, a frozen extractor).
        # Stage 2's epochs are the sampled name here: one name keeps one distribution in Optuna
        if "stage1_epochs" in s.fixed:  # --set stage1_epochs: stage 2 gets the rest
            e3, e1 = 0, int(s.fixed["stage1_epochs"])
            e2 = m - e1
        else:
            e3, e2 = 0, s.cat("stage2_epochs", sorted({0, *range(max(1, m - cap), m + 1)}))
            e1 = m - e2
    v = {"backbone": s.cat("backbone", o.backbones),
         "stage1_epochs": e1, "stage2_epochs": e2, "stage3_epochs": e3,
         "input_size": s.cat("input_size", INPUT_SIZES),
         "batch_size": s.cat("batch_size", [32, 64, 128]),
         "optimizer": s.cat("optimizer", ["sgd", "adamw", "rmsprop"]),
         "schedule": (schedule := s.cat("schedule", ["cosine", "onecycle", "constant", "step"])),
         "weight_decay": s.cat("weight_decay", WEIGHT_DECAYS),
         "label_smoothing": s.float("label_smoothing", 0.0, 0.2),
         "aug_strength": s.float("aug_strength", 0.0, 1.0),
         "mixup_alpha": s.float("mixup_alpha", 0.0, 0.8),
         "cutmix_alpha": s.float("cutmix_alpha", 0.0, 1.0),
         "head": s.cat("head", ["flat", "coarse_to_fine"]),
         "freeze_bn": s.cat("freeze_bn", [False, True])}
    if e1 > 0:
        v["stage1_lr"] = s.float("stage1_lr", 1e-4, 1e-1, log=True)
    if e2 > 0:
        v["unfreeze_depth"] = s.int("unfreeze_depth", 1, 7)
        v["stage2_lr"] = s.float("stage2_lr", 1e-5, 1e-1, log=True)
    if e3 > 0:
        v["stage3_lr"] = s.float("stage3_lr", 1e-5, 3e-2, log=True)
    if e2 > 0 or e3 > 0:  # discriminative lrs exist only where backbone blocks train
        v["backbone_lr_scale"] = s.float("backbone_lr_scale", 0.05, 1.0, log=True)
        v["layer_decay"] = s.float("layer_decay", 0.5, 1.0)
    if schedule == "constant":  # a flat lr needs a way down: cut it when val_loss stalls
        v["plateau_patience"] = s.int("plateau_patience", 0, 4)  # 0: a flat lr to the end
    return v
