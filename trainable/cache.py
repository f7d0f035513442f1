"""The project's own cache folder: the one place the product writes files the user did not name."""
from __future__ import annotations

import os
from pathlib import Path

ENV = "CIFAR_TUNE_CACHE"


def cache_root() -> Path:
    """$CIFAR_TUNE_CACHE, default ~/.cache/cifar-tune (not created here)."""
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "cifar-tune").expanduser()
