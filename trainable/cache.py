"""Where the project keeps its per-machine files (measured speeds, cached features, copies of
remote experiments): CIFAR_TUNE_CACHE, else ~/.cache/cifar-tune."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The project's per-machine cache folder (not created here)."""
    return Path(os.environ.get("CIFAR_TUNE_CACHE") or Path.home() / ".cache" / "cifar-tune")
