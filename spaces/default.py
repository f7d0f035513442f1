"""The GPU-scale space: five backbones, 64-224 px, every stage plan of spaces/finetune.py (frozen,
progressive unfreezing, all trainable), the full recipe toolbox (flat or coarse-to-fine head,
discriminative lrs, four schedules, reduce-on-plateau, mixup/cutmix, SGD/AdamW/RMSProp)."""
from spaces import Space
from spaces.finetune import sample_finetune, stage1_cap

SPACE = Space(
    name="default",
    description="GPU-scale: mobilenetv2/resnet18/resnet50/efficientnet-lite0/efficientnetv2-s, 64-224 px, 30 epochs",
    backbones=("mobilenetv2_100", "resnet50", "tf_efficientnetv2_s", "resnet18", "tf_efficientnet_lite0"),
    max_epochs=30, min_epochs=1, sample=sample_finetune, longest_stage1=stage1_cap)
