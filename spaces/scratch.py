"""The from-scratch baselines: one network trained end to end at 32 px with no pretrained weights
and a stem that keeps the full resolution (trainable/scratch.py); Adam, reduce-on-plateau and
early stopping on val_loss. resnet18_scratch, vgg13_scratch and alexnet_scratch are this recipe
with their backbone."""
from spaces import Space, recipe


def scratch_space(name: str, backbone: str, label: str) -> Space:
    # the whole network from the first epoch: stage 3 alone, one lr for every block
    return recipe(name, f"recipe: {label} from scratch, 32 px stem, plateau + early stop", backbone,
                  pretrained=False, small_input_stem=True, stage1_epochs=0, stage2_epochs=0, stage3_epochs=50,
                  stage3_lr=1e-3, layer_decay=1.0, backbone_lr_scale=1.0,
                  optimizer="adamw", weight_decay=5e-4, schedule="constant", warmup_frac=0.0,
                  plateau_patience=5, plateau_factor=0.2, early_stop_patience=10,
                  batch_size=128, label_smoothing=0.0, input_size=32, augment="flip,translate=0.125")
