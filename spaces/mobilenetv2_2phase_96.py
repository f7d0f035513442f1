"""Recipe: MobileNetV2 at 96 px, Keras-style: 10 epochs with the backbone frozen (Adam 1e-3), then
10 epochs with the top of the network trainable at lr 1e-5; flip and rotation, constant lr,
BatchNorm statistics kept frozen (Keras's `training=False` base)."""
from spaces import recipe

SPACE = recipe("mobilenetv2_2phase_96", "recipe: MobileNetV2 10 epochs frozen + 10 at lr 1e-5, 96 px",
               "mobilenetv2_100", unfreeze_depth=3,
               stage1_epochs=10, stage1_lr=1e-3, stage2_epochs=10, stage2_lr=1e-5,
               optimizer="adamw", weight_decay=0.0, schedule="constant", warmup_frac=0.0,
               batch_size=32, label_smoothing=0.0, input_size=96, augment="flip,rotate=20", freeze_bn=True)
