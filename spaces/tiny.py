"""CPU smoke runs: three small backbones, 32-64 px, at most 4 epochs."""
from spaces import Options, Space, Suggest, split_budget, stage_count


def sample(s: Suggest, o: Options) -> dict:
    stages = stage_count(s, sample=o.max_epochs >= 3)
    v = {"backbone": s.cat("backbone", o.backbones),
         **split_budget(s, o, stages, stage1_max=1),
         "unfreeze_depth": s.int("unfreeze_depth", 1, 3),
         "input_size": s.cat("input_size", [32, 48, 64]),
         "batch_size": s.cat("batch_size", [32, 64]),
         "stage1_lr": s.float("stage1_lr", 1e-3, 1e-1, log=True),
         "stage2_lr": s.float("stage2_lr", 1e-4, 3e-2, log=True),
         "aug_strength": s.float("aug_strength", 0.0, 1.0),
         "head": s.cat("head", ["flat", "coarse_to_fine"])}
    if stages == 3:
        v["stage3_lr"] = s.float("stage3_lr", 1e-4, 1e-2, log=True)
    return v


SPACE = Space(
    name="tiny",
    description="CPU smoke runs: efficientnet-lite0/resnet18/mobilenetv2, 32-64 px, <= 4 epochs",
    backbones=("tf_efficientnet_lite0", "resnet18", "mobilenetv2_100"),
    max_epochs=4, min_epochs=2, sample=sample)
