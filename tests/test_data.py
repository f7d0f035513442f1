"""Tests for trainable/data.py: loading, the safe unpickler, validation, splits and bundles."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.fake_cifar import missing, stand_in_dir, write_fake_cifar, write_pickle
from trainable.data import (
    load_cifar100,
    prepare_final_data,
    prepare_search_data,
    stratified_split,
    subset_per_class,
)
from trainable.errors import UserError


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    """A shared read-only fake dataset: 20 train / 5 test images per class."""
    return write_fake_cifar(tmp_path_factory.mktemp("fake"))


def _trusted_load(path: Path):
    with open(path, "rb") as f:  # our own fake files: plain pickle is fine here
        return pickle.load(f)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("numpy_core_name", ["numpy._core", "numpy.core"])
def test_loads_fake(tmp_path, numpy_core_name):
    write_fake_cifar(tmp_path, train_per_class=3, test_per_class=2, numpy_core_name=numpy_core_name)
    blob = (tmp_path / "cifar-100-python/train").read_bytes()
    assert f"c{numpy_core_name}.multiarray\n_reconstruct\n".encode() in blob  # the loader really sees that name

    ds = load_cifar100(tmp_path, splits=("train", "test"), download=False)
    for split, per_class in ((ds.train, 3), (ds.test, 2)):
        assert split.images.shape == (100 * per_class, 3, 32, 32)
        assert split.images.dtype == np.uint8 and split.images.flags.c_contiguous
        assert split.fine.dtype == split.coarse.dtype == np.int64
        assert np.array_equal(np.bincount(split.fine, minlength=100), np.full(100, per_class))
        assert np.array_equal(split.coarse, split.fine // 5)
    assert ds.fine_names == [f"class_{i:02d}" for i in range(100)]
    assert len(ds.coarse_names) == 20 and all(isinstance(s, str) for s in ds.coarse_names)

    raw = _trusted_load(tmp_path / "cifar-100-python/train")
    assert np.array_equal(ds.train.images.reshape(len(ds.train), -1), raw["data"])  # [N,3072] -> [N,3,32,32]


def test_only_requested_splits(fake):
    ds = load_cifar100(fake, download=False)
    assert ds.train is not None and ds.test is None


def test_bytes_keys_and_names(tmp_path):
    """Official Python 2 pickles may surface keys and names as bytes."""
    folder = write_fake_cifar(tmp_path, train_per_class=1, test_per_class=1) / "cifar-100-python"
    meta = _trusted_load(folder / "meta")
    write_pickle(folder / "meta", {k.encode(): [s.encode() for s in v] for k, v in meta.items()})
    train = _trusted_load(folder / "train")
    write_pickle(folder / "train", {k.encode(): v for k, v in train.items()})
    ds = load_cifar100(tmp_path, download=False)
    assert ds.fine_names[0] == "class_00" and len(ds.train) == 100


def test_stand_in():
    root = stand_in_dir()
    if root is None:
        missing("stand-in data (../shared/data/tinyimagenet100-32) not present")
    ds = load_cifar100(root, splits=("train",), download=False)
    assert ds.train.images.shape == (50000, 3, 32, 32) and ds.train.images.dtype == np.uint8
    assert len(np.unique(ds.train.fine)) == 100 and len(ds.fine_names) == 100 and len(ds.coarse_names) == 20


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_refuses_code_execution(tmp_path):
    folder = write_fake_cifar(tmp_path, train_per_class=1, test_per_class=1) / "cifar-100-python"
    marker = tmp_path / "MARKER"
    (folder / "train").write_bytes(pickle.dumps({"data": _Evil(f"touch {marker}")}))
    with pytest.raises(UserError) as err:
        load_cifar100(tmp_path, download=False)
    msg = str(err.value)
    assert "refusing to unpickle" in msg and "system" in msg and str(folder / "train") in msg
    assert not marker.exists()


# ----------------------------------------------------------------------------- corruptions


def _rewrite_train(change):
    """A corruption that loads the fake train dict, edits it with `change`, and writes it back."""

    def corrupt(folder: Path) -> Path:
        d = _trusted_load(folder / "train")
        write_pickle(folder / "train", change(d))
        return folder / "train"

    return corrupt


def _truncate(folder: Path) -> Path:
    path = folder / "train"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _garbage(folder: Path) -> Path:
    (folder / "train").write_bytes(b"this is not a pickle\n" * 50)
    return folder / "train"


def _bad_meta(folder: Path) -> Path:
    write_pickle(folder / "meta", {"fine_label_names": ["a"] * 99, "coarse_label_names": ["b"] * 20})
    return folder / "meta"


def _remove_folder(folder: Path) -> Path:
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return folder


def _set(key, fn):
    return _rewrite_train(lambda d: {**d, key: fn(d[key])})


CORRUPTIONS = {
    "truncated": (_truncate, False),
    "garbage": (_garbage, False),
    "float32_data": (_set("data", lambda a: a.astype(np.float32)), False),
    "shape_1000": (_set("data", lambda a: a[:, :1000].copy()), False),
    "fine_label_100": (_set("fine_labels", lambda v: [100] + v[1:]), False),
    "coarse_label_-1": (_set("coarse_labels", lambda v: [-1] + v[1:]), False),
    "length_mismatch": (_set("fine_labels", lambda v: v[:-1]), False),
    "missing_key": (_rewrite_train(lambda d: {k: v for k, v in d.items() if k != "coarse_labels"}), False),
    "not_a_dict": (_rewrite_train(lambda d: [d["data"]]), False),
    "meta_99_names": (_bad_meta, False),
    "missing_folder_no_download": (_remove_folder, False),
    "missing_folder_download_offline": (_remove_folder, True),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_is_a_one_line_user_error(tmp_path, monkeypatch, name):
    corrupt, download = CORRUPTIONS[name]
    folder = write_fake_cifar(tmp_path, train_per_class=2, test_per_class=1) / "cifar-100-python"
    culprit = corrupt(folder)
    if download:
        # Exercise torchvision's real download path against a closed local port: fails at once,
        # offline or not, and never fetches the real 160 MB archive inside a test.
        from torchvision.datasets import CIFAR100

        monkeypatch.setattr(CIFAR100, "url", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    with pytest.raises(UserError) as err:
        load_cifar100(tmp_path, download=download)
    msg = str(err.value)
    assert str(culprit) in msg and "\n" not in msg and "--data-dir" in msg


# ----------------------------------------------------------------------------- splits


def _labels(counts: list[int]) -> np.ndarray:
    return np.random.default_rng(1).permutation(np.repeat(np.arange(len(counts)), counts))


def test_stratified_split():
    labels = _labels([50, 20, 10, 3, 2, 1])
    train, val = stratified_split(labels, 0.1, seed=0)
    np.random.seed(123)  # global RNG state must not matter
    train2, val2 = stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=1)[1])

    assert train.dtype == val.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted, no duplicates
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))  # disjoint + covering
    # round(n_c * 0.1), at least 1 for classes with >= 2 images, none from a single-image class
    assert np.bincount(labels[val], minlength=6).tolist() == [5, 2, 1, 1, 1, 0]


def test_stratified_split_edges():
    labels = _labels([10, 10])
    train, val = stratified_split(labels, 0.0, seed=0)
    assert len(val) == 0 and len(train) == 20
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(UserError, match=r"--val-fraction must be in \[0, 1\)"):
            stratified_split(labels, bad, seed=0)


def test_subset_per_class():
    labels = _labels([10, 5, 2])
    idx = subset_per_class(labels, 4, seed=0)
    assert np.bincount(labels[idx]).tolist() == [4, 4, 2]
    assert np.all(np.diff(idx) > 0) and idx.dtype == np.int64
    assert np.array_equal(idx, subset_per_class(labels, 4, seed=0))
    with pytest.raises(UserError):
        subset_per_class(labels, 0, seed=0)


# ----------------------------------------------------------------------------- bundles


def _rows(*imagesets: np.ndarray) -> list[bytes]:
    return sorted(bytes(img) for images in imagesets for img in images)


def test_search_data_never_reads_test_file(tmp_path):
    folder = write_fake_cifar(tmp_path, train_per_class=10, test_per_class=2) / "cifar-100-python"
    (folder / "test").unlink()
    sd = prepare_search_data(tmp_path, subset=5, val_fraction=0.2, seed=0, download=False)
    assert len(sd.train) == 400 and len(sd.val) == 100
    assert np.bincount(sd.val.fine, minlength=100).tolist() == [1] * 100
    assert len(sd.fine_names) == 100
    with pytest.raises(UserError, match="test"):  # ...whereas the final data does need it
        prepare_final_data(tmp_path, subset=5, seed=0, download=False)


def test_final_data_is_search_train_plus_val(fake):
    sd = prepare_search_data(fake, subset=4, val_fraction=0.25, seed=3, download=False)
    fd = prepare_final_data(fake, subset=4, seed=3, val_fraction=0.25, download=False)
    assert _rows(fd.train_val.images) == _rows(sd.train.images, sd.val.images)
    assert len(fd.test) == 500 and fd.fine_names == sd.fine_names and len(fd.coarse_names) == 20
    train, val = fd.search_split()  # the search's exact split, for configs that train on val_loss
    assert np.array_equal(train.images, sd.train.images) and np.array_equal(val.fine, sd.val.fine)

    full = prepare_final_data(fake, subset=None, seed=3, download=False)
    assert len(full.train_val) == 2000
    assert pickle.loads(pickle.dumps(sd)).train.images.shape == sd.train.images.shape  # object-store friendly
