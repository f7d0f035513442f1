"""CIFAR-100 loading and the train/val/test bundles handed to Ray trials.

Reads the official `cifar-100-python` archive layout (pickled dicts) with an unpickler
that can rebuild NumPy arrays and nothing else, validates every field, and keeps
images as uint8 [N, 3, 32, 32]. Everything here is plain numpy + lists so the bundles
pickle cheaply into Ray's object store.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np
from filelock import FileLock

from trainable.errors import UserError

FOLDER = "cifar-100-python"
NUM_FINE, NUM_COARSE = 100, 20
_HINT = f"point --data-dir at a folder holding {FOLDER}/{{train,test,meta}}"


@dataclass
class Split:
    """One split: images uint8 [N, 3, 32, 32], fine labels int64 [N] in [0, 100), coarse int64 [N] in [0, 20)."""

    images: np.ndarray
    fine: np.ndarray
    coarse: np.ndarray

    def __len__(self) -> int:
        return len(self.fine)

    def take(self, idx: np.ndarray) -> Split:
        """The rows `idx` (a copy), in that order."""
        return Split(self.images[idx], self.fine[idx], self.coarse[idx])


@dataclass
class Cifar100:
    train: Split | None  # None when not requested in `splits`
    test: Split | None
    fine_names: list[str]
    coarse_names: list[str]


@dataclass
class SearchData:
    """What a search trial trains and validates on; the test file is never part of it."""

    train: Split
    val: Split
    fine_names: list[str]
    coarse_names: list[str]


@dataclass
class FinalData:
    """What the final retrain and the one test evaluation use."""

    train_val: Split  # the whole training file, or the search's per-class subset of it
    train_index: np.ndarray  # rows of train_val that were the search's train split ...
    val_index: np.ndarray  # ... and its validation split
    test: Split
    fine_names: list[str]
    coarse_names: list[str]

    def search_split(self) -> tuple[Split, Split]:
        """(train, val) exactly as the search had them: for configs that train on val_loss."""
        return self.train_val.take(self.train_index), self.train_val.take(self.val_index)


# ----------------------------------------------------------------------------- loading

# The one function NumPy pickles call to rebuild an array; taken from ndarray's own
# __reduce__ so we need not import a private module whose name changed in NumPy 2.
_RECONSTRUCT = np.ndarray.__reduce__(np.empty(0))[0]


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """A pickle can run any code on load; this one may only rebuild NumPy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # NumPy 1 (official files)
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # NumPy 2
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # official files are Python 2 pickles
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise UserError(
                f"refusing to unpickle {module}.{name} from {self.path}: not a CIFAR-100 file; {_HINT}"
            ) from None


def _bad(path: Path, problem: str) -> UserError:
    return UserError(f"{path}: {problem}; replace it with the file from the official archive or {_HINT}")


def _unpickle(path: Path) -> dict:
    """Load one pickled dict, with str keys (Python 2 pickles may have bytes keys)."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, path).load()
    except FileNotFoundError:
        raise _bad(path, "file is missing") from None
    except OSError as e:
        raise _bad(path, f"cannot read it ({e.strerror or e})") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise _bad(path, f"truncated or corrupt pickle ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise _bad(path, f"expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _require(d: dict, keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise _bad(path, f"missing keys {missing}")


def _labels(values, n: int, num_classes: int, key: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray(values)
    except ValueError:
        arr = np.asarray([])  # ragged: reported as not-integers below
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise _bad(path, f"'{key}' must be a list of integers")
    if len(arr) != n:
        raise _bad(path, f"'{key}' has {len(arr)} entries but 'data' has {n} images")
    if arr.min() < 0 or arr.max() >= num_classes:
        raise _bad(path, f"'{key}' must lie in [0, {num_classes}), found {arr.min()}..{arr.max()}")
    return arr.astype(np.int64)


def _read_split(path: Path) -> Split:
    d = _unpickle(path)
    _require(d, ("data", "fine_labels", "coarse_labels"), path)
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _bad(path, f"'data' must be a uint8 array of shape [N, 3072], got {got}")
    n = len(data)
    if n == 0:
        raise _bad(path, "'data' holds no images")
    fine = _labels(d["fine_labels"], n, NUM_FINE, "fine_labels", path)
    coarse = _labels(d["coarse_labels"], n, NUM_COARSE, "coarse_labels", path)
    # Rows are 1024 R, 1024 G, 1024 B values, row-major: exactly C-order [3, 32, 32], so this is a view.
    images = np.ascontiguousarray(data).reshape(n, 3, 32, 32)
    return Split(images, fine, coarse)


def _read_names(path: Path) -> tuple[list[str], list[str]]:
    d = _unpickle(path)
    _require(d, ("fine_label_names", "coarse_label_names"), path)
    out = []
    for key, count in (("fine_label_names", NUM_FINE), ("coarse_label_names", NUM_COARSE)):
        names = d[key]
        if not isinstance(names, list) or len(names) != count or not all(isinstance(s, (str, bytes)) for s in names):
            raise _bad(path, f"'{key}' must be a list of {count} names")
        out.append([s.decode("latin1") if isinstance(s, bytes) else s for s in names])
    return out[0], out[1]


def _ensure_present(data_dir: Path, download: bool) -> Path:
    """The `cifar-100-python` folder, downloading the official archive if allowed and absent."""
    folder = data_dir / FOLDER
    if folder.is_dir():
        return folder
    if not download:
        raise UserError(f"CIFAR-100 not found: {folder} does not exist and downloading is off; {_HINT}")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --data-dir {data_dir} ({e.strerror or e}); {_HINT}") from None
    # torchvision is only needed for this rare path, so import it here (it pulls in torch).
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    # Concurrent trials/processes may all find the folder missing; one downloads, the rest wait.
    with FileLock(str(data_dir / ".cifar-100.lock")):
        if not folder.is_dir():  # someone else may have finished while we waited
            try:
                download_and_extract_archive(CIFAR100.url, str(data_dir), md5=CIFAR100.tgz_md5)
            except (URLError, OSError, RuntimeError) as e:
                reason = " ".join(str(e).split())  # keep the message on one line
                raise UserError(
                    f"CIFAR-100 not found at {folder} and downloading it failed ({type(e).__name__}: {reason}); {_HINT}"
                ) from e
    if not folder.is_dir():
        raise UserError(f"the downloaded archive did not contain {folder}; {_HINT}")
    return folder


def load_cifar100(data_dir: str | Path, *, splits: tuple[str, ...] = ("train",), download: bool = True) -> Cifar100:
    """Load the requested splits of `DATA_DIR/cifar-100-python/` (downloading it if absent and allowed)."""
    unknown = set(splits) - {"train", "test"}
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; use 'train' and/or 'test'")
    folder = _ensure_present(Path(data_dir), download)
    fine_names, coarse_names = _read_names(folder / "meta")
    train = _read_split(folder / "train") if "train" in splits else None
    test = _read_split(folder / "test") if "test" in splits else None
    return Cifar100(train, test, fine_names, coarse_names)


# ----------------------------------------------------------------------------- splitting


def _by_class(labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """Each class's indices, shuffled by a generator of its own (global RNG state never matters)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]


def _sorted(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts + [np.empty(0, np.int64)]).astype(np.int64))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train_idx, val_idx): each class sends round(n_c * val_fraction) images to val.

    A class with >= 2 images sends at least 1 when val_fraction > 0, and always keeps at least 1 for training.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}; pass e.g. --val-fraction 0.1")
    train, val = [], []
    for idx in _by_class(labels, seed):
        k = round(len(idx) * val_fraction)
        if val_fraction > 0 and len(idx) >= 2:
            k = max(k, 1)
        k = min(k, len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return _sorted(train), _sorted(val)


def subset_per_class(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of n random images per class (all of a class that has fewer)."""
    if n < 1:
        raise UserError(f"--subset must be >= 1 images per class, got {n}; pass e.g. --subset 50 or omit it")
    return _sorted([idx[:n] for idx in _by_class(labels, seed)])


# ----------------------------------------------------------------------------- bundles


def _train_subset(data_dir: str | Path, splits: tuple[str, ...], subset: int | None, seed: int, download: bool):
    ds = load_cifar100(data_dir, splits=splits, download=download)
    train = ds.train if subset is None else ds.train.take(subset_per_class(ds.train.fine, subset, seed))
    return ds, train


def prepare_search_data(
    data_dir: str | Path, *, subset: int | None, val_fraction: float, seed: int, download: bool = True
) -> SearchData:
    """Train/val from the training file only (the test file is never read during a search).

    `subset` (images per class) is taken from the training file before the split, with the
    same seed as `prepare_final_data`, so the final retrain sees exactly this train + val.
    """
    ds, full = _train_subset(data_dir, ("train",), subset, seed, download)
    train_idx, val_idx = stratified_split(full.fine, val_fraction, seed)
    return SearchData(full.take(train_idx), full.take(val_idx), ds.fine_names, ds.coarse_names)


def prepare_final_data(
    data_dir: str | Path, *, subset: int | None, seed: int, val_fraction: float = 0.1, download: bool = True
) -> FinalData:
    """train + val and test for the final retrain and the one test evaluation.

    train + val is the whole training file (or the same per-class subset the search used); with
    the search's `val_fraction` and `seed`, `search_split()` gives back its exact train/val split.
    The test split is always complete.
    """
    ds, train = _train_subset(data_dir, ("train", "test"), subset, seed, download)
    train_idx, val_idx = stratified_split(train.fine, val_fraction, seed)
    return FinalData(train, train_idx, val_idx, ds.test, ds.fine_names, ds.coarse_names)
