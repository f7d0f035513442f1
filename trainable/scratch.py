"""Backbones for training from scratch on 32 px images: the CIFAR forms of ResNet and VGG, and AlexNet.

ResNet's ImageNet stem leaves a 32 px image at 8x8 before the first block, VGG's head expects a 7x7 map
where 32 px leaves 1x1: `adapt_small_input` swaps in the CIFAR stem or head. Importing this module
registers a 32 px `alexnet` with timm.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import ResNet
from timm.models.vgg import VGG
from torch import nn

from trainable.errors import UserError

_FIX = "use a plain-stem timm resnet*/vgg* or alexnet, or turn off small_input_stem"


def adapt_small_input(backbone: nn.Module, name: str) -> None:
    """Give a fresh timm backbone (classifier already reset) a stem that suits 32x32 inputs."""
    if isinstance(backbone, ResNet):
        if not isinstance(backbone.conv1, nn.Conv2d):  # deep stems (resnet*d, ...): no standard swap
            raise UserError(f"small_input_stem can't adapt {name}: its deep stem (conv1 is a "
                            f"Sequential) has no standard CIFAR form; {_FIX}")
        old = backbone.conv1
        # the CIFAR ResNet stem: 3x3/1 conv, no max-pool, so layer1 sees the full 32x32
        backbone.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False,
                                   **get_device_dtype(old))
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")  # as timm's
        backbone.maxpool = nn.Identity()
    elif isinstance(backbone, VGG):
        # at 32 px the max-pools leave 512x1x1, which timm's pre_logits (7x7 conv, ~100M params) would
        # upsample: the CIFAR head is a global pool (num_classes is 0 already: the 512 pooled features)
        backbone.pre_logits = nn.Identity()
        backbone.head = ClassifierHead(backbone.num_features, backbone.num_classes, pool_type="avg",
                                       drop_rate=backbone.drop_rate, **get_device_dtype(backbone))
        backbone.head.train(backbone.training)
        backbone.head_hidden_size = backbone.num_features  # 512: what backbone(x) now returns
    elif not isinstance(backbone, AlexNet):  # ours is built for 32 px already
        raise UserError(f"small_input_stem supports ResNet, VGG and alexnet backbones, not {name}: {_FIX}")


class AlexNet(nn.Module):
    """AlexNet's widths (64-192-384-256-256 convs, dropout FC head) for 32 px: a 3x3/1 first conv, the
    3x3/2 max-pools kept (32 -> 15 -> 7 -> 3), FC layers of 1024 (~6M params, not 60M)."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.5,
                 hidden: int = 1024):
        super().__init__()
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.num_features = self.head_hidden_size = hidden  # timm's pre-logits width: what Net sees
        pool = lambda: nn.MaxPool2d(kernel_size=3, stride=2)  # noqa: E731
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 64, 3, padding=1), relu(), pool(),  # 0
            nn.Conv2d(64, 192, 3, padding=1), relu(), pool(),  # 3
            nn.Conv2d(192, 384, 3, padding=1), relu(),  # 6
            nn.Conv2d(384, 256, 3, padding=1), relu(),  # 8
            nn.Conv2d(256, 256, 3, padding=1), relu(), pool(),  # 10
        )
        self.pool = nn.AdaptiveAvgPool2d(3)  # identity at 32 px; lets upsampled inputs fit the FC
        self.pre_logits = nn.Sequential(
            nn.Dropout(drop_rate), nn.Linear(256 * 3 * 3, hidden), relu(),
            nn.Dropout(drop_rate), nn.Linear(hidden, hidden), relu(),
        )
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        # He init for the ReLU stack: PyTorch's default (kaiming_uniform, a=sqrt(5)) shrinks the
        # signal through 7 un-normalised layers and training sits at ln(100) for epochs
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        # stem, one group per conv (features.3 ... features.10), then the FC pre-logits last
        # (a (99999,) suffix would not do: timm reads it as "merge into the previous group")
        return dict(stem=r"^features\.0\.", blocks=r"^features\.(\d+)\.", pre_logits=r"^pre_logits\.")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass  # too small to need it

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        # global_pool is ignored: the FC head needs the fixed 3x3 map, not a global pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, **get_device_dtype(self)) if num_classes > 0 \
            else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.pool(x).flatten(1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# register_model reads this module's default_cfgs; without a url, pretrained=True keeps the random init
default_cfgs = generate_default_cfgs({
    "alexnet": dict(url="", num_classes=1000, input_size=(3, 32, 32), pool_size=(3, 3), crop_pct=1.0,
                    interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                    first_conv="features.0", classifier="head"),
})

with warnings.catch_warnings():  # a re-import re-registers (overwrites) our own entry: not news
    warnings.filterwarnings("ignore", message=r"Overwriting alexnet in registry with trainable\.scratch")

    @register_model
    def alexnet(pretrained: bool = False, **kwargs: Any) -> AlexNet:
        """AlexNet for 32 px inputs (random init only)."""
        return build_model_with_cfg(AlexNet, "alexnet", pretrained, **kwargs)
