"""The CPU space: what wins on a CPU at small scale, with a real choice of backbone.

Three ImageNet-pretrained EfficientNet-Lite backbones (0/1/2: the offline weights in
../shared/weights), 64-224 px, and every stage plan of spaces/finetune.py: a frozen feature
extractor is cheap per epoch and strong at high resolution (52.9 % for frozen lite0 at 224 px in
issue 6's table), fine-tuning more of the network pays at lower resolution.
"""
from spaces import Space
from spaces.finetune import sample_finetune, stage1_cap

SPACE = Space(
    name="cpu",
    description="CPU: efficientnet-lite0/1/2, 64-224 px, frozen to all-trainable plans, 4 epochs (default with no GPU)",
    backbones=("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"),
    max_epochs=4, min_epochs=1, sample=sample_finetune, longest_stage1=stage1_cap)
