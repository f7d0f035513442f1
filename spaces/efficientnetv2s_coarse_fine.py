"""Recipe: EfficientNetV2-S with the first half of the network frozen (stem and stages 0-2; stages
3-5 train) and a coarse-to-fine head: the 20-superclass head's logits feed the 100-class head with
the features; both losses count. The backbone learns at a tenth of the heads' lr."""
from spaces import recipe

SPACE = recipe("efficientnetv2s_coarse_fine", "recipe: EfficientNetV2-S half frozen, coarse-to-fine head, 224 px",
               "tf_efficientnetv2_s", head="coarse_to_fine", coarse_loss_weight=0.5,
               stage1_epochs=0, stage2_epochs=20, unfreeze_depth=3,
               stage2_lr=1e-3, backbone_lr_scale=0.1, layer_decay=1.0,
               optimizer="adamw", weight_decay=1e-4, schedule="cosine", batch_size=64,
               label_smoothing=0.1, input_size=224, augment="flip,rotate=15,translate=0.1")
