"""The network: a timm backbone cut into ordered blocks, a new head, and freezing.

Blocks come from timm's own metadata (`group_matcher(coarse=True)`: stem, then one group per
stage), so "unfreeze depth k" means the top k blocks of any backbone without a per-model table.
"""
from __future__ import annotations

import argparse
import pickle
import socket
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import timm
import torch
from huggingface_hub import constants, try_to_load_from_cache
from timm.models import group_parameters, load_state_dict
from torch import nn

from trainable.config import HEADS
from trainable.data import NUM_COARSE, NUM_FINE
from trainable.errors import UserError
from trainable.scratch import adapt_small_input  # also registers the 32 px "alexnet" with timm


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
    weights = weights_file(weights_dir, name) if weights_dir else None
    backbone = timm.create_model(name, pretrained=pretrained and weights is None)
    if pretrained and weights is not None:
        load_weights(backbone, weights, name)
    backbone.reset_classifier(0)  # pooled features out; our head is separate
    if small_input_stem:
        adapt_small_input(backbone, name)
    return Net(backbone, head)


WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt", ".pth.tar")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # a Hugging Face model folder's weights
HUB_CACHE_FILES = (*HUB_FILES, "open_clip_pytorch_model.bin")


def weights_file(weights_dir: str | Path, name: str) -> Path | None:
    """The weights of backbone `name` in `weights_dir`: NAME.pth (or .pt, .safetensors, .bin, .ckpt, .pth.tar),
    or a Hugging Face download NAME/model.safetensors (or pytorch_model.bin); None when absent."""
    folder = Path(weights_dir).expanduser()
    for path in [folder / f"{name}{s}" for s in WEIGHT_SUFFIXES] + [folder / name / f for f in HUB_FILES]:
        if path.is_file():
            return path
    return None


def check_weights(name: str, pretrained: bool, weights_dir: str = "") -> None:
    """Fail fast, before any training, when the backbone or its pretrained weights can't be had."""
    if not timm.is_model(name):
        raise UserError(f"unknown backbone {name!r}: use a timm model name (timm.list_models())")
    if not pretrained:
        return
    if weights_dir:
        if Path(weights_dir).expanduser().is_file():
            raise UserError(f"--weights-dir {weights_dir} is a file: pass the folder holding it, with the file "
                            f"named <timm name>.pth ({name}.pth for this backbone)")
        if weights_file(weights_dir, name) is None:
            path = Path(weights_dir) / f"{name}.pth"
            if path.is_dir():
                raise UserError(f"{path} is a folder, not a weights file: put the file {name}.pth (or .safetensors) "
                                f"in --weights-dir {weights_dir} in its place")
            raise UserError(f"no weights file {path} for backbone {name}: put <timm name>.pth (or .safetensors) in "
                            f"--weights-dir, or drop --weights-dir to use the hub, or train from scratch "
                            f"(run_search.py --no-pretrained; analyze.py --set pretrained=false)")
        return
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file):
        raise UserError(f"backbone {name} has no pretrained weights: train it from scratch "
                        f"(run_search.py --no-pretrained; analyze.py --set pretrained=false)")
    # fail in seconds, not after timm's ~50 s of retries, when the weights are not cached and can't be fetched
    repo = (cfg.hf_hub_id or "").split("@")[0]
    if repo and any(isinstance(try_to_load_from_cache(repo, f), str) for f in HUB_CACHE_FILES):
        return
    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname or "", 443), timeout=3.0).close()
    except OSError:
        raise UserError(f"pretrained weights for {name} are not cached and the model hub is "
                        f"unreachable: pass --weights-dir DIR holding {name}.pth, or --no-pretrained") from None


def load_weights(backbone: nn.Module, path: Path, name: str) -> None:
    """Load the ImageNet weights in file `path` into `backbone` (a fresh timm `name`) from a state_dict or
    a checkpoint holding one (_STATE_KEYS), under any wrapper's key prefixes (_PREFIXES), without the
    classifier (the fine-tune replaces it); UserError, one line, saying what does not fit and the fix.
    (timm's load_checkpoint knows only timm's own keys and prefixes, and fails with a traceback.)"""
    fix = f"save the state_dict of timm.create_model({name!r}) (torch.save(model.state_dict(), {path.name!r}))"
    state = _unwrap(_read_weights(path, fix))
    if state is None:
        raise UserError(f"weights file {path} holds no state_dict (no dict of tensors, nor one under 'state_dict', "
                        f"'model', 'ema', ...): {fix}")
    expected = backbone.state_dict()
    # the classifier's keys in the file are dropped even where the model has none (reset_classifier(0))
    state = _match_keys(state, expected)
    dropped, classifier = _classifier_keys(backbone, state), _classifier_keys(backbone, expected)
    state = {k: v for k, v in state.items() if k not in dropped}
    body = [k for k in expected if k not in classifier]
    missing = [k for k in body if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}" for k in body
             if k in state and state[k].shape != expected[k].shape]
    # a bigger sibling's file (lite1's for lite0) holds every tensor of the smaller at the same shape, and more
    # of the same modules; a wrapper's own tensors (AveragedModel's n_averaged, our heads) sit beside them
    # (when tensors are missing too, every unknown one says what the file holds instead)
    modules = {k.split(".")[0] for k in expected}
    extra = [k for k in state if k not in expected and not k.endswith("num_batches_tracked")
             and (missing or k.split(".")[0] in modules)]
    if missing or wrong or extra:
        problems = []
        if missing:
            problems.append(f"{len(missing)} of the model's {len(body)} tensors missing ({_few(missing)})")
        if extra:
            problems.append(f"{len(extra)} tensors unknown to it ({_few(extra)})")
        if wrong:
            problems.append(f"{len(wrong)} of other shapes ({_few(wrong)}; file vs model)")
        raise UserError(f"weights file {path} does not fit backbone {name}: {'; '.join(problems)}: it holds "
                        f"another model's weights, or {fix}")
    backbone.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


# keys under which checkpoints of common trainers keep the weights, EMA first as timm prefers it
_STATE_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "model_state_dict", "state_dict",
               "model", "net", "network", "weights", "params", "module", "backbone")
# prefixes wrappers add to every key: DataParallel/DDP, torch.compile, Lightning, EMA, a model holding ours
_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "net.", "network.", "encoder.", "ema.", "model_ema.")


def _read_weights(path: Path, fix: str) -> dict:
    """The file's top-level object via timm's loader (safetensors too), unpickling tensors and plain data only."""
    try:
        with torch.serialization.safe_globals(_harmless_globals()):
            return load_state_dict(str(path), use_ema=True)
    except (RuntimeError, pickle.UnpicklingError) as e:
        if "Unsupported global" in f"{e} {e.__cause__}":  # torch's weights_only refused a class
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if zipfile.is_zipfile(path) else []
            what = f" ({_few(unsafe)})" if unsafe else ""
            raise UserError(f"weights file {path} holds Python objects{what} besides tensors, not loaded since "
                            f"unpickling them can run code: if you trust the file, re-save the weights alone, "
                            f"torch.save(torch.load(f, weights_only=False).state_dict(), f) for a whole pickled "
                            f"model (or its 'state_dict' entry for a checkpoint)") from None
        raise _unreadable(path, e.__cause__ or e, fix) from None
    except Exception as e:  # noqa: BLE001 - torch, safetensors and pickle raise many types for a damaged file
        raise _unreadable(path, e, fix) from None


def _unreadable(path: Path, e: Exception, fix: str) -> UserError:
    reason = " ".join(str(e).split()).split(". ")[0][:160] or type(e).__name__
    return UserError(f"weights file {path} cannot be read as PyTorch or safetensors weights ({type(e).__name__}: "
                     f"{reason}): it is truncated or not a weights file; download it again or {fix}")


def _harmless_globals() -> list:
    """Plain-data types training checkpoints hold besides tensors (timm's args, NumPy metrics)."""
    scalar = np.int64(0).__reduce__()[0]  # the function NumPy pickles its scalars with
    dtypes = [t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)]
    return [argparse.Namespace, scalar, np.dtype, *dtypes]


def _unwrap(obj, depth: int = 0) -> dict[str, torch.Tensor] | None:
    """The state_dict in a checkpoint: `obj` itself when it maps names to tensors, else the first one
    under _STATE_KEYS (a few levels deep); None when there is none."""
    if not isinstance(obj, dict) or depth > 3:
        return None
    for key in _STATE_KEYS:  # a dict under one of these is never a tensor of a state_dict
        found = _unwrap(obj.get(key), depth + 1) if isinstance(obj.get(key), dict) else None
        if found:
            return found
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(obj) / 2:  # AveragedModel adds a step counter, Lightning none
        return timm.models.clean_state_dict(tensors)
    return None


def _match_keys(state: dict[str, torch.Tensor], expected: dict) -> dict[str, torch.Tensor]:
    """`state` with wrapper prefixes taken off each key that does not match the model as it is."""
    out = {}
    for key, value in state.items():
        k = key
        while k not in expected and k.startswith(_PREFIXES):
            k = k[k.index(".") + 1:]
        out[k if k in expected else key] = value
    return out


def _classifier_keys(backbone: nn.Module, keys) -> set[str]:
    """Those of `keys` (a state_dict's) under the backbone's classifier module, as timm's pretrained_cfg names it."""
    names = getattr(backbone, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return {k for k in keys if any(k.startswith(f"{n}.") for n in names)}


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


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
