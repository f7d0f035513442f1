"""Every file the product writes goes through here: each is the new complete file or the old one, never
half-written: written to a hidden temporary beside it, flushed, then renamed over the real name.
`together()` renames several files that describe each other only once all are complete. A failed write
is a UserError naming the path (and for a full disk the space it needs), leaving no temporary behind.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainable.errors import UserError

_FULL = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "disk quota exceeded"}


class Files:
    """The files of one `together()` block, each written to its temporary until the block ends."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []  # (temporary, real name), in write order

    def write_bytes(self, path: str | Path, data: bytes | memoryview) -> None:
        """Write `data` to `path`'s temporary; UserError (path, space needed) when it fails."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self._pending.append((tmp, path))  # before opening: a failed write is cleaned up too
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on the disk before the rename: a crash never leaves an empty file
        except OSError as e:
            raise write_error(path, e, len(data)) from None

    def write_text(self, path: str | Path, text: str, encoding: str = "utf-8") -> None:
        """`text` encoded (UTF-8 by default) to `path`."""
        self.write_bytes(path, text.encode(encoding))

    def torch_save(self, obj: Any, path: str | Path) -> None:
        """`torch.save(obj)` to `path`, serialised in memory first: the size is known and a write error is the
        system's (torch's own writer reports a full disk as a RuntimeError)."""
        import torch  # lazy: the torch-free read side (report, analysis) writes through this module too
        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(path, buf.getbuffer())

    def _commit(self) -> None:
        for i, (tmp, path) in enumerate(self._pending):
            try:
                os.replace(tmp, path)
            except OSError as e:
                self._pending = self._pending[i:]
                raise write_error(path, e, tmp.stat().st_size if tmp.exists() else 0) from None
        self._pending = []

    def _discard(self) -> None:
        for tmp, _ in self._pending:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self._pending = []


@contextlib.contextmanager
def together() -> Iterator[Files]:
    """Write several files as one: every file is renamed into place only after all were written
    (in the order written), and none is when the block raises (its temporaries are deleted)."""
    files = Files()
    try:
        yield files
        files._commit()
    finally:
        files._discard()


def write_bytes(path: str | Path, data: bytes) -> None:
    """`data` to `path`, atomically (see the module doc)."""
    with together() as f:
        f.write_bytes(path, data)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """`text` to `path`, atomically (see the module doc)."""
    with together() as f:
        f.write_text(path, text, encoding)


def torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`, atomically (see the module doc)."""
    with together() as f:
        f.torch_save(obj, path)


def write_error(path: Path, e: OSError, size: int) -> UserError:
    """The one-line error for a failed write of `size` bytes to `path`: for a full disk or quota the space
    needed and free, else the system's reason."""
    reason = _FULL.get(e.errno)
    if reason is None:
        return UserError(f"cannot write {path} ({e.strerror or e}): check that its folder exists and is writable, "
                         f"or write elsewhere")
    try:
        free = f", {_mb(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = ""
    return UserError(f"cannot write {path}: {reason} (it needs {_mb(size)}{free}): free space on that "
                     f"disk (or raise the quota) and run the command again; nothing was half-written")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
