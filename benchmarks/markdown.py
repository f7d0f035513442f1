"""Each benchmark writes its own generated block of BENCHMARKS.md, between its own markers."""
from __future__ import annotations

from pathlib import Path


def replace_block(path: Path, block: str) -> None:
    """Replace the block whose first and last lines (its `<!-- x:begin -->`/`<!-- x:end -->`
    markers) start and end `block`, keeping all text around it; append it when absent."""
    lines = block.strip().splitlines()
    begin, end = lines[0], lines[-1]
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        pre, rest = old.split(begin, 1)
        text = pre + block.strip() + rest.split(end, 1)[1]
    else:
        text = (old.rstrip() + "\n\n" if old.strip() else "# Benchmarks\n\n") + block.strip() + "\n"
    path.write_text(text)
