"""Recipe: ResNet-50 three-stage progressive unfreezing at 224 px (the seed document's 84.35 %).

Stage 1 head only (OneCycle to 0.01); stage 2 layer3 + layer4 + head at 6e-4 / 1e-3 / 5e-3;
stage 3 everything, stem 5.2e-5 up to head 2e-3 (backbone_lr_scale 0.2 and layer_decay 0.6 give
these; the source's stage-2 layer3 rate was 5e-4). SGD Nesterov, OneCycle, mixup/cutmix 0.8
switched with p 0.5 (timm's default), label smoothing 0.1, rich augmentation, batch 32, early
stopping with patience 10 on val_loss."""
from spaces import recipe

SPACE = recipe("resnet50_3stage_224", "recipe: ResNet-50 3-stage, 224 px, OneCycle, mixup/cutmix (84.35 %)",
               "resnet50", unfreeze_depth=2,
               stage1_epochs=10, stage1_lr=1e-2, stage2_epochs=10, stage2_lr=5e-3,
               stage3_epochs=20, stage3_lr=2e-3, backbone_lr_scale=0.2, layer_decay=0.6,
               optimizer="sgd", schedule="onecycle", weight_decay=5e-4, batch_size=32,
               label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=0.8, early_stop_patience=10, input_size=224,
               augment="flip,rotate=15,translate=0.1,zoom=0.1,jitter=0.4,grayscale=0.1,perspective,blur=0.1,erase=0.25")
