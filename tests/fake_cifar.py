"""A small, learnable fake CIFAR-100 in the official `cifar-100-python` on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

NUM_FINE, NUM_COARSE = 100, 20


def _split_dict(protos: np.ndarray, per_class: int, rng: np.random.Generator, batch_label: str) -> dict:
    fine = rng.permutation(np.repeat(np.arange(NUM_FINE), per_class))  # shuffled, like the official files
    noise = rng.normal(0, 25, size=(len(fine), 3, 32, 32))
    images = np.clip(protos[fine] + noise, 0, 255).astype(np.uint8)
    return {
        "batch_label": batch_label,
        "data": images.reshape(len(fine), 3072),  # 1024 R, 1024 G, 1024 B, row-major
        "fine_labels": fine.tolist(),
        "coarse_labels": (fine // 5).tolist(),
        "filenames": [f"class_{c:02d}_s_{i:06d}.png" for i, c in enumerate(fine)],
    }


def write_pickle(path: Path, obj, numpy_core_name: str = "numpy._core") -> None:
    """Pickle `obj` as the official files do, naming NumPy's array rebuilder under `numpy_core_name`.

    Protocol 3 writes globals as text lines ("cnumpy._core.multiarray\\n_reconstruct\\n") and has
    no length-prefixed frames, so the module name can be swapped in the byte stream; this is how
    files that reference the NumPy 1 name `numpy.core.multiarray` are produced under NumPy 2.
    """
    blob = pickle.dumps(obj, protocol=3)
    rebuild = np.ndarray.__reduce__(np.empty(0))[0]  # the function NumPy pickles arrays with
    native = f"c{rebuild.__module__}\n{rebuild.__name__}\n".encode()
    wanted = f"c{numpy_core_name}.multiarray\n{rebuild.__name__}\n".encode()
    Path(path).write_bytes(blob.replace(native, wanted))


def write_fake_cifar(
    root: Path,
    *,
    train_per_class: int = 20,
    test_per_class: int = 5,
    seed: int = 0,
    numpy_core_name: str = "numpy._core",
) -> Path:
    """Write `root/cifar-100-python/{train,test,meta}`; returns root.

    Each class is a distinct blocky colour pattern (a random 4x4 RGB grid upscaled to 32x32)
    plus Gaussian noise, so even a tiny CNN beats the 1% chance level within an epoch or two.
    Coarse label = fine // 5. `numpy_core_name` is "numpy._core" (NumPy 2) or "numpy.core" (NumPy 1).
    """
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(NUM_FINE, 3, 4, 4)).repeat(8, axis=2).repeat(8, axis=3).astype(np.float64)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    write_pickle(folder / "train", _split_dict(protos, train_per_class, rng, "training batch 1 of 1"), numpy_core_name)
    write_pickle(folder / "test", _split_dict(protos, test_per_class, rng, "testing batch 1 of 1"), numpy_core_name)
    meta = {
        "fine_label_names": [f"class_{i:02d}" for i in range(NUM_FINE)],
        "coarse_label_names": [f"superclass_{i:02d}" for i in range(NUM_COARSE)],
    }
    write_pickle(folder / "meta", meta)
    return Path(root)


def stand_in_dir() -> Path | None:
    """The real-image stand-in (../shared/data next to the repo) when present, else None."""
    path = Path(__file__).resolve().parents[2] / "shared/data/tinyimagenet100-32"
    return path if (path / "cifar-100-python").is_dir() else None


def missing(reason: str) -> None:
    """Skip a test whose input is absent here (../shared, chromium, ...); in CI (CI=true), where it
    must be present, fail instead: a skipped test there would hide the bug it was written for."""
    import os

    import pytest
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{reason} (CI=true: this test must run in CI, not be skipped)", pytrace=False)
    pytest.skip(reason)


def random_split(n: int, seed: int):
    """A trainable.data.Split of `n` random 32x32 images and labels (no classes to learn)."""
    from trainable.data import Split
    r = np.random.default_rng(seed)
    return Split(r.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), r.integers(0, 100, n), r.integers(0, 20, n))
