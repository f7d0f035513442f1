"""Recipe: ResNet-50 three-stage progressive unfreezing, discriminative lrs, SGD Nesterov, OneCycle,
mixup/cutmix, rich augmentation, 224 px (the seed document's 84.35 % recipe). Nothing is sampled."""
from spaces import Options, Space, Suggest


def sample(s: Suggest, o: Options) -> dict:
    return {"backbone": s.cat("backbone", o.backbones), "stages": 3, "unfreeze_depth": 2,
            "stage1_epochs": 3, "stage1_lr": 1e-2, "stage2_epochs": 7, "stage2_lr": 5e-3,
            "stage3_epochs": 20, "stage3_lr": 2e-3, "layer_decay": 0.7,
            "optimizer": "sgd", "schedule": "onecycle", "weight_decay": 5e-4, "batch_size": 64,
            "label_smoothing": 0.1, "mixup_alpha": 0.2, "cutmix_alpha": 1.0,
            "input_size": 224, "aug_strength": 1.0}


SPACE = Space(name="resnet50_84", description="recipe: ResNet-50 3-stage, 224 px, OneCycle, mixup/cutmix (84.35 %)",
              backbones=("resnet50",), max_epochs=30, min_epochs=30, sample=sample, recipe=True)
