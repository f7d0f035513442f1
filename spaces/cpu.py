"""The CPU space: three pretrained EfficientNet-Lite backbones (the offline weights in ../shared/weights),
64-224 px, every stage plan of spaces/finetune.py: a frozen extractor is cheap and strong at high
resolution (52.9 % for lite0 at 224 px), fine-tuning more of the network pays at lower resolution.
"""
from spaces import Space
from spaces.finetune import sample_finetune, stage1_cap

SPACE = Space(
    name="cpu",
    description="CPU: efficientnet-lite0/1/2, 64-224 px, frozen to all-trainable plans, 4 epochs (default with no GPU)",
    backbones=("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"),
    max_epochs=4, min_epochs=1, sample=sample_finetune, longest_stage1=stage1_cap)
