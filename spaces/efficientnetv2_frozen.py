"""Recipe: EfficientNetV2-B0 as a frozen feature extractor (only the head trains), at its own
224 px; Adam, reduce-on-plateau and early stopping on val_loss."""
from spaces import recipe

SPACE = recipe("efficientnetv2_frozen", "recipe: EfficientNetV2-B0 frozen features + head, 224 px, plateau + early stop",
               "tf_efficientnetv2_b0", stage1_epochs=30, stage1_lr=1e-3, stage2_epochs=0,  # stage 1 alone: frozen
               optimizer="adamw", weight_decay=0.0, schedule="constant", warmup_frac=0.0,
               plateau_patience=3, plateau_factor=0.2, early_stop_patience=6,
               batch_size=64, label_smoothing=0.0, input_size=224, augment="flip")
