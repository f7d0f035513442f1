"""Recipe: MobileNetV2 two-stage fine-tune at 128 px: head only, then the top blocks at a 10x lower
lr; label smoothing, flip/rotate/translate/zoom, cosine decay (the seed document's 71 % recipe)."""
from spaces import recipe

SPACE = recipe("mobilenetv2_2stage_128", "recipe: MobileNetV2 2-stage, 128 px, cosine, 20 epochs (71 %)",
               "mobilenetv2_100", unfreeze_depth=3,
               stage1_epochs=5, stage1_lr=1e-3, stage2_epochs=15, stage2_lr=1e-4,
               optimizer="adamw", schedule="cosine", weight_decay=1e-4, batch_size=128,
               label_smoothing=0.1, input_size=128, augment="flip,rotate=15,translate=0.1,zoom=0.1", freeze_bn=True)
