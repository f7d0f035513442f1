"""The network: a timm backbone cut into ordered blocks, a new head, and freezing.

Blocks come from timm's own metadata (`group_matcher(coarse=True)`: stem, then one group per
stage), so "unfreeze depth k" means the top k blocks of any backbone without a per-model table.
"""
from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models import group_parameters
from torch import nn

from trainable.config import HEADS
from trainable.data import NUM_COARSE, NUM_FINE
from trainable.errors import UserError
from trainable.scratch import (
    adapt_small_input,  # also registers the 32 px "alexnet" with timm
)


class Net(nn.Module):
    """Backbone features -> head. "coarse_to_fine": a 20-superclass head's softmax feeds the fine
    head together with the features, and forward returns (fine, coarse) logits."""

    def __init__(self, backbone: nn.Module, head: str = "flat"):
        super().__init__()
        if head not in HEADS:
            raise UserError(f"unknown head {head!r}: use one of {', '.join(HEADS)}")
        self.backbone = backbone
        # the width backbone(x) returns once its classifier is reset: past any pre-logits layer
        # (VGG's MLP, MobileNetV3's conv_head), which num_features stops short of
        width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        coarse = head == "coarse_to_fine"
        self.coarse_head = nn.Linear(width, NUM_COARSE) if coarse else None
        self.fine_head = nn.Linear(width + (NUM_COARSE if coarse else 0), NUM_FINE)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)  # pooled pre-logits: the backbone's classifier is removed
        if self.coarse_head is None:
            return self.fine_head(f)
        coarse = self.coarse_head(f)
        # the fine head sees the coarse *probabilities*: bounded, so a large lr can't feed the
        # fine head ever larger logits (which diverged at SGD lr 0.08)
        return self.fine_head(torch.cat([f, coarse.softmax(dim=1)], dim=1)), coarse

    def head_parameters(self) -> list[nn.Parameter]:
        heads = [self.fine_head] + ([self.coarse_head] if self.coarse_head is not None else [])
        return [p for h in heads for p in h.parameters()]

    def blocks(self) -> list[list[nn.Parameter]]:
        """Backbone parameters in ordered blocks, bottom (stem) first."""
        named = dict(self.backbone.named_parameters())
        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
        return [[named[n] for n in names] for _, names in sorted(groups.items())]


def create_model(name: str, *, pretrained: bool, weights_dir: str = "", head: str = "flat",
                 small_input_stem: bool = False) -> Net:
    """A timm backbone (ImageNet weights when `pretrained`) with fresh 100-class head(s)."""
    check_weights(name, pretrained, weights_dir)
    weights = Path(weights_dir) / f"{name}.pth" if weights_dir else None
    backbone = timm.create_model(name, pretrained=pretrained and weights is None)
    if pretrained and weights is not None:
        load_weights(backbone, weights, name)
    backbone.reset_classifier(0)  # pooled features out; our head is separate
    if small_input_stem:
        adapt_small_input(backbone, name)
    return Net(backbone, head)


def check_weights(name: str, pretrained: bool, weights_dir: str = "") -> None:
    """Fail fast, before any training, when the backbone or its pretrained weights can't be had."""
    if not timm.is_model(name):
        raise UserError(f"unknown backbone {name!r}: use a timm model name (timm.list_models())")
    if not pretrained:
        return
    if weights_dir:
        path = Path(weights_dir) / f"{name}.pth"
        if not path.is_file():
            raise UserError(f"no weights file {path} for backbone {name}: put <timm name>.pth in "
                            f"--weights-dir, or drop --weights-dir to use the hub, or train from scratch "
                            f"(run_search.py --no-pretrained; analyze.py --set pretrained=false)")
        return
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file):
        raise UserError(f"backbone {name} has no pretrained weights: train it from scratch "
                        f"(run_search.py --no-pretrained; analyze.py --set pretrained=false)")
    check_hub_reachable(name)


def load_weights(backbone: nn.Module, path: Path, name: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state, strict=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file does not fit
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"weights file {path} does not fit backbone {name} ({first[:160]}): "
                        f"use a timm state_dict saved from that exact model") from None


def check_hub_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not after timm's ~50 s of retries, when the weights can't be fetched."""
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if hub_id and _in_hf_cache(hub_id):
        return
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        raise UserError(f"pretrained weights for {name} are not cached and the model hub is "
                        f"unreachable: pass --weights-dir DIR holding {name}.pth, or --no-pretrained") from None


def _in_hf_cache(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    repo = hub_id.split("@")[0]
    return any(isinstance(try_to_load_from_cache(repo, f), str)
               for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))


def set_trainable(net: Net, top_blocks: int | None) -> None:
    """Train the head plus the top `top_blocks` backbone blocks (None = all). Frozen = no grad."""
    blocks = net.blocks()
    n_frozen = 0 if top_blocks is None else max(0, len(blocks) - top_blocks)
    for i, block in enumerate(blocks):
        for p in block:
            p.requires_grad_(i >= n_frozen)
    for p in net.head_parameters():
        p.requires_grad_(True)


def train_mode(net: nn.Module, freeze_bn: bool = False) -> None:
    """model.train(), but BatchNorm layers whose parameters are frozen keep their running stats
    (with `freeze_bn`, every BatchNorm does: the Keras fine-tuning practice)."""
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if freeze_bn or (params and not any(p.requires_grad for p in params)):
                m.eval()
