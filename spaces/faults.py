"""A tiny space in which some trials fail for real, to test that a search survives them: a stage-1 lr so
large the loss diverges, and freeze_bn, which CIFAR_TUNE_FAULT=oom@2:freeze_bn=True (tests/fault_hook)
turns into an out-of-memory error in epoch 2.
"""
from spaces import Options, Space, Suggest


def sample(s: Suggest, o: Options) -> dict:
    return {"backbone": s.cat("backbone", o.backbones),
            "stage1_epochs": 1, "stage2_epochs": o.max_epochs - 1, "unfreeze_depth": 1,
            "input_size": 32, "batch_size": 32, "stage2_lr": 1e-3,
            "stage1_lr": s.cat("stage1_lr", [0.01, 1e12]),
            "freeze_bn": s.cat("freeze_bn", [False, True])}


SPACE = Space(name="faults", description="test space: some trials diverge or run out of memory",
              backbones=("tf_efficientnet_lite0", "resnet18"), max_epochs=2, min_epochs=2, sample=sample)
