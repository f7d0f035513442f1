"""Recipe: BiT-HyperRule, Big Transfer's one-shot fine-tuning rule (Kolesnikov et al., "Big Transfer
(BiT): General Visual Representation Learning", ECCV 2020, Sec. 3.3, and the reference code
github.com/google-research/big_transfer, bit_hyperrule.py): SGD with momentum 0.9, lr 0.003 at
batch 512 (scaled linearly here to batch 128: 7.5e-4), linear warm-up (500 of 10,000 steps: 5 %),
then the lr cut 10x at 30, 60 and 90 % of training; everything trainable from the first step, no
weight decay; images smaller than 96 px are resized to 160 and randomly cropped to 128 (here:
upsampled to 128 with random translation, our on-device equivalent) with a horizontal flip; mixup
alpha 0.1 for datasets of 20k images or more (CIFAR-100's 50k are)."""
from spaces import recipe

BATCH = 128
LR = 0.003 * BATCH / 512  # the rule's lr is for batch 512; linear scaling (Goyal et al. 2017)

# everything trainable from the start: stage 3 alone, one lr for every block
SPACE = recipe("bit_hyperrule", "recipe: BiT-HyperRule, all trainable, SGD 0.003@512, step decay, mixup 0.1, 128 px",
               "resnet50", stage1_epochs=0, stage2_epochs=0, stage3_epochs=20, stage3_lr=LR,
               layer_decay=1.0, backbone_lr_scale=1.0,
               optimizer="sgd", schedule="step", warmup_frac=0.05, weight_decay=0.0,
               batch_size=BATCH, label_smoothing=0.0, mixup_alpha=0.1, input_size=128, augment="flip,translate=0.125")
