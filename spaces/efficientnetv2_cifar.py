"""Recipe: the EfficientNetV2 paper's transfer fine-tune to CIFAR (Tan & Le, "EfficientNetV2: Smaller
Models and Faster Training", ICML 2021, Sec. 6 / Table 9 transfer-learning setup): everything
trainable, RMSProp (TensorFlow-style: decay 0.9, momentum 0.9), lr 5e-4 after a 1-epoch linear
warm-up, then cosine decay; weight decay 1e-5, label smoothing 0.1, at the backbone's 224 px with
flip and light translation."""
from spaces import recipe

EPOCHS = 20

SPACE = recipe("efficientnetv2_cifar", "recipe: EfficientNetV2 paper's CIFAR fine-tune, all trainable, RMSProp 5e-4, 224 px",
               "tf_efficientnetv2_s", stage1_epochs=0, stage2_epochs=0, stage3_epochs=EPOCHS, stage3_lr=5e-4,
               layer_decay=1.0, backbone_lr_scale=1.0,
               optimizer="rmsprop", schedule="cosine", warmup_frac=1 / EPOCHS,  # 1 epoch
               weight_decay=1e-5, batch_size=64, label_smoothing=0.1, input_size=224, augment="flip,translate=0.1")
