"""Write-then-rename, so a killed process never leaves a half-written file under the real name."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def write_text(path: Path, text: str) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def torch_save(obj: Any, path: Path) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
