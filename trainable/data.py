"""CIFAR-100 loading and the train/val/test bundles handed to Ray trials, as plain numpy (cheap to pickle).

The official `cifar-100-python` pickles (by Python 2 or 3, any protocol) are read by an unpickler that
builds plain data and NumPy arrays only, every field checked; images stay uint8 [N, 3, 32, 32].
(torchvision's CIFAR100 unpickles whatever the file holds and knows one folder layout: it serves the download.)
"""

from __future__ import annotations

import codecs
import copyreg
import errno
import hashlib
import os
import pickle
import shutil
import tarfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np
from filelock import FileLock

from trainable.cache import ENV as CACHE_ENV
from trainable.cache import cache_root
from trainable.errors import UserError

FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"
SPLIT_FILES = ("train", "test", "meta")
NUM_FINE, NUM_COARSE = 100, 20
_HINT = f"point --data-dir at the folder holding {FOLDER}/{{train,test,meta}}, at {FOLDER} itself or at {ARCHIVE}"


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

def _reconstructor(obj, protocol: int):
    """The callable NumPy pickles `obj` with (names differ between NumPy 1 and 2, so ask NumPy)."""
    return obj.__reduce_ex__(protocol)[0]


_RECONSTRUCT = _reconstructor(np.empty(0), 2)  # ndarray, protocols 0-4: _reconstruct + __setstate__
_FROMBUFFER = _reconstructor(np.empty(1), 5)  # ndarray, protocol 5: _frombuffer(buffer, dtype, shape, order)
_SCALAR = _reconstructor(np.int64(0), 2)  # numpy scalars: scalar(dtype, bytes)
# Plain data types: calling one (or its __new__, or BUILD on the result) can only build a value.
_SAFE_TYPES = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool,
               OrderedDict, object)
_TEXT_CODECS = {"iso8859-1", "utf-8", "ascii"}  # codecs.lookup names of latin1/latin-1, utf8, ascii


class _Refused(pickle.UnpicklingError):
    """A global or a call the pickle may not make; the message names it."""


def _encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as pickle protocols 0-2 use it to store bytes: text codecs only (the
    others, zlib or base64 for example, are transforms a CIFAR file never needs)."""
    if not isinstance(text, str) or codecs.lookup(encoding).name not in _TEXT_CODECS:
        raise _Refused(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return codecs.encode(text, encoding, errors)


def _copyreg_reconstructor(cls, base, state):
    """copyreg._reconstructor (protocols 0-1 write it for some objects), for plain data types only."""
    if cls not in _SAFE_TYPES or base not in _SAFE_TYPES:
        raise _Refused(f"copyreg._reconstructor({getattr(cls, '__name__', cls)}, {getattr(base, '__name__', base)})")
    return copyreg._reconstructor(cls, base, state)


def _globals() -> dict[tuple[str, str], object]:
    """Every global a CIFAR-format pickle may name, by Python 2 and 3 at protocols 0-5, NumPy 1 and 2."""
    allowed: dict[tuple[str, str], object] = {}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _RECONSTRUCT
        allowed[(f"{core}.multiarray", "scalar")] = _SCALAR
        allowed[(f"{core}.numeric", "_frombuffer")] = _FROMBUFFER
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for builtins in ("builtins", "__builtin__"):  # Python 3 writes __builtin__ at protocols 0-2, as Python 2 did
        allowed.update({(builtins, t.__name__): t for t in _SAFE_TYPES if t is not OrderedDict})
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed[("_codecs", "encode")] = _encode
    for module in ("copyreg", "copy_reg"):
        allowed[(module, "_reconstructor")] = _copyreg_reconstructor
    return allowed


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """A pickle can run any code on load: every global it names passes find_class, which refuses any
    not in ALLOWED (os.system, eval, getattr, other NumPy functions, ...) before it is called."""

    ALLOWED = _globals()

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def _bad(path: Path, problem: str) -> UserError:
    return UserError(f"{path}: {problem}; replace it with the file from the official archive or {_HINT}")


def _unpickle(path: Path, keys: tuple[str, ...]) -> dict:
    """Load one pickled dict holding `keys`, with str keys (Python 2 pickles may have bytes keys)."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="latin1").load()  # official files are Python 2 pickles
    except FileNotFoundError:
        raise _bad(path, "file is missing") from None
    except _Refused as e:
        raise UserError(f"refusing to unpickle {e} from {path}: not a CIFAR-100 file; {_HINT}") from None
    except OSError as e:
        raise _bad(path, f"cannot read it ({e.strerror or e})") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, LookupError,
            OverflowError, MemoryError) as e:
        raise _bad(path, f"truncated or corrupt pickle ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise _bad(path, f"expected a pickled dict, got {type(obj).__name__}")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in keys if k not in d]
    if missing:
        raise _bad(path, f"missing keys {missing}")
    return d


def _py2_bytes(x):
    """A Python 2 `str` of raw bytes arrives as a latin-1 decoded str: its bytes again (else x)."""
    try:
        return x.encode("latin1") if isinstance(x, str) else x
    except UnicodeEncodeError:
        return x


def _labels(values, n: int, num_classes: int, key: str, path: Path) -> np.ndarray:
    values = _py2_bytes(values)
    if isinstance(values, (bytes, bytearray)):  # one byte per label
        values = np.frombuffer(values, np.uint8)
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


def _pixels(data, path: Path) -> np.ndarray:
    """uint8 [N, 3072] from 'data': an array, a list of rows (lists of ints, bytes or arrays) or one
    bytes blob, of integers in 0..255; anything else (floats, other shapes) is refused."""
    data = _py2_bytes(data)
    if isinstance(data, (bytes, bytearray)) and len(data) % 3072 == 0:
        data = np.frombuffer(data, np.uint8).reshape(-1, 3072)
    elif isinstance(data, (list, tuple)):
        rows = [_py2_bytes(r) for r in data]
        rows = [np.frombuffer(r, np.uint8) if isinstance(r, (bytes, bytearray)) else r for r in rows]
        try:
            data = np.asarray(rows) if rows else np.empty((0, 3072), np.uint8)
        except ValueError:
            raise _bad(path, "'data' must be rows of 3072 values, got rows of different lengths") from None
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "iu" or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _bad(path, f"'data' must be uint8 values of shape [N, 3072], got {got}")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise _bad(path, f"'data' values must lie in 0..255, found {data.min()}..{data.max()}")
        data = data.astype(np.uint8)
    return data


def _read_split(path: Path) -> Split:
    d = _unpickle(path, ("data", "fine_labels", "coarse_labels"))
    data = _pixels(d["data"], path)
    n = len(data)
    if n == 0:
        raise _bad(path, "'data' holds no images")
    fine = _labels(d["fine_labels"], n, NUM_FINE, "fine_labels", path)
    coarse = _labels(d["coarse_labels"], n, NUM_COARSE, "coarse_labels", path)
    # Rows are 1024 R, 1024 G, 1024 B values, row-major: exactly C-order [3, 32, 32], so this is a view.
    images = np.ascontiguousarray(data).reshape(n, 3, 32, 32)
    return Split(images, fine, coarse)


def _read_names(path: Path) -> tuple[list[str], list[str]]:
    d = _unpickle(path, ("fine_label_names", "coarse_label_names"))
    out = []
    for key, count in (("fine_label_names", NUM_FINE), ("coarse_label_names", NUM_COARSE)):
        names = d[key]
        if isinstance(names, (tuple, np.ndarray)):
            names = list(names.tolist() if isinstance(names, np.ndarray) else names)
        if not isinstance(names, list) or len(names) != count or not all(isinstance(s, (str, bytes)) for s in names):
            raise _bad(path, f"'{key}' must be a list of {count} names")
        out.append([s.decode("latin1") if isinstance(s, bytes) else s for s in names])
    return out[0], out[1]


def _is_dataset_folder(d: Path) -> bool:
    """`d` is the `cifar-100-python` folder itself: named so, or holding its files."""
    return d.name == FOLDER or any((d / f).is_file() for f in SPLIT_FILES)


def _innermost(folder: Path) -> Path:
    """`folder`, or the `cifar-100-python/` inside it when the archive was extracted into a folder
    of the same name (`.../cifar-100-python/cifar-100-python/train`)."""
    for _ in range(2):
        if any((folder / f).is_file() for f in SPLIT_FILES) or not (folder / FOLDER).is_dir():
            break
        folder = folder / FOLDER
    return folder


def _ensure_present(data_dir: Path, download: bool) -> Path:
    """The `cifar-100-python` folder `data_dir` names: the folder holding it, the folder itself (or a file
    in it), or the official archive (or a folder holding it), extracted once into the cache; else
    downloaded when allowed. Nothing is written into the user's folders but a completed download."""
    data_dir = Path(data_dir).expanduser()
    if data_dir.is_file():
        if data_dir.name in SPLIT_FILES and _is_dataset_folder(data_dir.parent):
            return data_dir.parent
        return _extracted(data_dir)
    if data_dir.is_dir():
        if (data_dir / FOLDER).is_dir():
            return _innermost(data_dir / FOLDER)
        if _is_dataset_folder(data_dir):
            return _innermost(data_dir)
        if (data_dir / ARCHIVE).is_file():
            return _extracted(data_dir / ARCHIVE)
    elif data_dir.exists() or data_dir.is_symlink():
        raise UserError(f"--data-dir {data_dir} is neither a folder nor a file (a broken link?); {_HINT}")
    other = _other_dataset(data_dir)
    if other:  # not a download's job: the folder holds something else
        raise UserError(f"--data-dir {data_dir} holds {other}, not CIFAR-100: only the official {FOLDER} "
                        f"format is read; {_HINT}")
    if not download:
        raise UserError(f"CIFAR-100 not found: {_absent(data_dir)} and downloading is off; {_HINT}")
    return _download(data_dir)


def _other_dataset(d: Path) -> str:
    """What other dataset layout folder `d` holds (CIFAR-10's pickles, class folders of images), or ''."""
    if not d.is_dir():
        return ""
    for folder in (d, d / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() or (folder / "batches.meta").is_file():
            return f"CIFAR-10 ({folder.name}: 10 classes)"
    images = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
    for root in [d, *_folders(d)]:  # class folders at the top (ImageFolder), or under train/ and val/
        if any(f.suffix.lower() in images for c in _folders(root)[:5] for f in _entries(c)):
            return "folders of image files (an ImageFolder layout)"
    return ""


def _entries(d: Path, n: int = 50) -> list[Path]:
    """Up to `n` entries of folder `d` ([] when it can't be listed), without listing a huge folder whole."""
    try:
        return [e for _, e in zip(range(n), d.iterdir())]
    except OSError:
        return []


def _folders(d: Path) -> list[Path]:
    return [e for e in _entries(d) if e.is_dir()]


def _absent(data_dir: Path) -> str:
    if not data_dir.exists():
        return f"--data-dir {data_dir} does not exist"
    return f"{data_dir / FOLDER} does not exist (nor {ARCHIVE} or the dataset's files in {data_dir})"


def _cache(kind: str) -> Path:
    folder = cache_root() / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache folder {folder} ({e.strerror or e}): set {CACHE_ENV} "
                        f"to a writable folder") from None
    return folder


def _key(path: Path) -> str:
    """A cache key for `path`: its absolute path, and for a file its size and mtime (a replaced archive is
    extracted again)."""
    p = path.resolve()
    st = p.stat() if p.is_file() else None
    tag = f"{p}|{st.st_size}|{st.st_mtime_ns}" if st else str(p)
    return hashlib.sha1(tag.encode()).hexdigest()[:16]


def _find_folder(root: Path) -> Path | None:
    """The extracted dataset folder under `root`: `cifar-100-python/` (or the folder holding its files)."""
    for d in [root, *sorted(p for p in root.glob("*") if p.is_dir()), *sorted(p for p in root.glob("*/*") if p.is_dir())]:
        if all((d / f).is_file() for f in SPLIT_FILES):
            return d
    return None


def _extracted(archive: Path) -> Path:
    """The dataset folder of a `cifar-100-python.tar.gz`, extracted once (under a lock) into the cache."""
    try:
        is_tar = tarfile.is_tarfile(archive)
    except (OSError, EOFError, zlib.error):
        is_tar = False
    if not is_tar and not archive.name.endswith((".tar.gz", ".tgz", ".tar")):  # else: reported as corrupt below
        raise UserError(f"--data-dir {archive} is a file but not the cifar-100-python.tar.gz archive; {_HINT}, "
                        f"or at the official .tar.gz as downloaded")
    key = _key(archive)
    done = _cache("data") / key
    with FileLock(str(_cache("locks") / f"{key}.lock")):
        if not done.is_dir():
            tmp = done.with_name(f".{key}.tmp-{os.getpid()}")
            try:
                with tarfile.open(archive, "r:*") as tar:
                    # the "data" filter refuses links and paths outside tmp (not the default before 3.14)
                    tar.extractall(tmp, filter="data")
                if _find_folder(tmp) is None:
                    raise UserError(f"{archive} does not hold {FOLDER}/{{{','.join(SPLIT_FILES)}}}: "
                                    f"pass the official cifar-100-python.tar.gz")
                os.replace(tmp, done)
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                reason = " ".join(str(e).split()) or type(e).__name__
                raise _extract_failed(archive, tmp, e, reason) from None
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    folder = _find_folder(done)
    if folder is None:  # someone emptied the cache entry: extract again next time
        shutil.rmtree(done, ignore_errors=True)
        raise UserError(f"the extracted copy of {archive} in {done} is incomplete: run the command again")
    return folder


def _extract_failed(archive: Path, tmp: Path, e: Exception, reason: str) -> UserError:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space to extract {archive} into {tmp.parent} ({reason}; it needs about "
                         f"{3 * archive.stat().st_size / 1e6:.0f} MB): free space there or set {CACHE_ENV} "
                         f"to a folder on a bigger disk")
    if isinstance(e, OSError) and not isinstance(e, (tarfile.TarError, EOFError)) and e.filename:
        return UserError(f"cannot extract {archive} into {tmp.parent} ({reason}): set {CACHE_ENV} to a writable folder")
    return UserError(f"{archive} is truncated or corrupt ({reason}): download cifar-100-python.tar.gz again")


def _download(data_dir: Path) -> Path:
    """Fetch the official archive into the cache, then move its folder to `data_dir/cifar-100-python`
    (creating `data_dir` only then: a failed download leaves no folder behind)."""
    from torchvision.datasets import CIFAR100  # lazy: torch-free until a download (it pulls in torch)
    from torchvision.datasets.utils import download_url

    folder = data_dir / FOLDER
    key = _key(data_dir)
    # Concurrent trials/processes may all find the folder missing; one downloads, the rest wait.
    with FileLock(str(_cache("locks") / f"download-{key}.lock")):
        if folder.is_dir():  # someone else finished while we waited
            return folder
        tmp = _cache("downloads") / f"{key}.tmp-{os.getpid()}"
        try:
            download_url(CIFAR100.url, str(tmp), filename=ARCHIVE, md5=CIFAR100.tgz_md5)
            if not (tmp / ARCHIVE).is_file():  # torchvision returns without raising on some failures
                raise RuntimeError("no file was downloaded")
            extracted = _extracted(tmp / ARCHIVE)
            data_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(str(extracted), str(folder))
        except (URLError, OSError, RuntimeError) as e:
            reason = " ".join(str(e).split())  # keep the message on one line
            raise UserError(f"CIFAR-100 not found: {_absent(data_dir)}, and downloading it failed "
                            f"({type(e).__name__}: {reason}); {_HINT}") from e
        finally:
            if (tmp / ARCHIVE).is_file():
                shutil.rmtree(_cache("data") / _key(tmp / ARCHIVE), ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_cifar100(data_dir: str | Path, *, splits: tuple[str, ...] = ("train",), download: bool = True) -> Cifar100:
    """Load the requested splits of the dataset `data_dir` names (in any form _ensure_present takes)."""
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
    """Sorted (train_idx, val_idx): each class sends round(n_c * val_fraction) images to val, at least 1
    when val_fraction > 0 and it has 2, and keeps at least 1 for training."""
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
    """Train/val from the training file only (a search never reads the test file: `test_split_problem` checks it).
    `subset` (images per class) is taken before the split, with the seed `prepare_final_data` uses, so the retrain
    sees this train + val."""
    ds, full = _train_subset(data_dir, ("train",), subset, seed, download)
    train_idx, val_idx = stratified_split(full.fine, val_fraction, seed)
    return SearchData(full.take(train_idx), full.take(val_idx), ds.fine_names, ds.coarse_names)


def test_split_problem(data_dir: str | Path) -> str:
    """Why the test file of the dataset `data_dir` names can't be loaded ('' when it can): a search runs
    without it, but analyze.py tests the winner on it, so the search says so before it starts."""
    try:
        _read_split(_ensure_present(Path(data_dir), download=False) / "test")
    except UserError as e:
        return str(e)
    return ""


def prepare_final_data(
    data_dir: str | Path, *, subset: int | None, seed: int, val_fraction: float = 0.1, download: bool = True
) -> FinalData:
    """train + val (the training file, or the search's per-class subset of it) and the whole test split;
    with the search's `val_fraction` and `seed`, `search_split()` gives back its train/val split."""
    ds, train = _train_subset(data_dir, ("train", "test"), subset, seed, download)
    train_idx, val_idx = stratified_split(train.fine, val_fraction, seed)
    return FinalData(train, train_idx, val_idx, ds.test, ds.fine_names, ds.coarse_names)


def fidelity_subset(split: Split, fraction: float, seed: int) -> Split:
    """A stratified `fraction` of `split` (each class keeps its share, at least one image), the
    same for every trial with this seed: a low-fidelity trial sees fewer images, not fewer epochs."""
    if fraction >= 1.0:
        return split
    keep, _ = stratified_split(split.fine, 1.0 - fraction, seed)
    return split.take(keep)
