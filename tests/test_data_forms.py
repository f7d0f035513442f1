"""--data-dir in every form a user has the dataset: the parent folder, the `cifar-100-python` folder
itself (or a file in it), the official .tar.gz as downloaded (or a folder holding only it); never a
file written into the user's folders, never a folder made for a path a download does not fill."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.test_bad_input import OFFLINE
from tests.fake_cifar import write_fake_cifar
from trainable.data import ARCHIVE, FOLDER, load_cifar100
from trainable.errors import UserError


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return write_fake_cifar(tmp_path_factory.mktemp("forms"), train_per_class=2, test_per_class=1)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CIFAR_TUNE_CACHE", str(cache))
    return cache


def _archive(parent: Path, dest: Path, top: str = FOLDER) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(parent / FOLDER, arcname=top)
    return dest


def _snapshot(root: Path) -> dict[str, float]:
    """Every path under root (and root itself) with its mtime: anything written there changes it."""
    return {str(p): p.stat().st_mtime_ns for p in [root, *root.rglob("*")]}


def _same_data(a, b) -> bool:
    return np.array_equal(a.train.images, b.train.images) and a.fine_names == b.fine_names


def test_parent_folder_itself_file_in_it_and_archive_give_the_same_data(parent, tmp_path, own_cache):
    want = load_cifar100(parent, download=False)
    archive = _archive(parent, tmp_path / "downloads" / ARCHIVE)
    only_archive = tmp_path / "only"
    only_archive.mkdir()
    _archive(parent, only_archive / ARCHIVE)
    renamed = _archive(parent, tmp_path / "my copy.tgz")
    before = {**_snapshot(parent), **_snapshot(tmp_path / "downloads"), **_snapshot(only_archive)}
    for form in (parent, parent / FOLDER, parent / FOLDER / "train", archive, only_archive, renamed,
                 archive):  # the archive twice: the second time from the cache
        assert _same_data(load_cifar100(form, download=False), want), form
    # nothing was written beside the user's files: no lock, no extracted folder
    assert {**_snapshot(parent), **_snapshot(tmp_path / "downloads"), **_snapshot(only_archive)} == before
    assert list((own_cache / "data").iterdir())  # extracted into our cache instead
    assert not [p for p in own_cache.rglob("*") if ".tmp-" in p.name]


def test_the_archive_extracted_into_a_folder_of_its_name(parent, tmp_path):
    import shutil
    nested = tmp_path / "data" / FOLDER
    shutil.copytree(parent / FOLDER, nested / FOLDER)
    want = load_cifar100(parent, download=False)
    for form in (tmp_path / "data", nested):
        assert _same_data(load_cifar100(form, download=False), want)


def test_a_replaced_archive_is_extracted_again(parent, tmp_path):
    archive = _archive(parent, tmp_path / ARCHIVE)
    first = load_cifar100(archive, download=False)
    other = write_fake_cifar(tmp_path / "other", train_per_class=2, test_per_class=1, seed=5)
    _archive(other, archive)
    os.utime(archive, ns=(1, 1))  # a different mtime even on a coarse clock
    second = load_cifar100(archive, download=False)
    assert not np.array_equal(first.train.images, second.train.images)


def _offline(monkeypatch):
    from torchvision.datasets import CIFAR100
    monkeypatch.setattr(CIFAR100, "url", "http://127.0.0.1:9/cifar-100-python.tar.gz")  # a closed port


@pytest.mark.parametrize("download", [False, True])
def test_a_mistyped_path_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, own_cache, download):
    _offline(monkeypatch)
    typo = tmp_path / "dtaa" / "cifar"
    with pytest.raises(UserError) as err:
        load_cifar100(typo, download=download)
    msg = str(err.value)
    assert "\n" not in msg and f"--data-dir {typo} does not exist" in msg
    assert not (tmp_path / "dtaa").exists()  # no folder, no lock file made for the typo
    assert not [p for p in own_cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_a_failed_download_into_an_empty_folder_leaves_it_empty(tmp_path, monkeypatch):
    _offline(monkeypatch)
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(UserError, match="downloading it failed"):
        load_cifar100(empty)
    assert list(empty.iterdir()) == []


def test_a_download_fills_the_folder_only_once_it_succeeded(parent, tmp_path, monkeypatch, own_cache):
    import shutil

    from torchvision.datasets import utils
    archive = _archive(parent, tmp_path / "served" / ARCHIVE)

    def fake_download(url, root, filename=None, md5=None):  # what torchvision does, from a local file
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(archive, Path(root) / filename)
    monkeypatch.setattr(utils, "download_url", fake_download)
    target = tmp_path / "new" / "data"
    got = load_cifar100(target)
    assert _same_data(got, load_cifar100(parent, download=False))
    assert sorted(p.name for p in target.iterdir()) == [FOLDER]  # the data, no lock or archive
    assert sorted(p.name for p in (target / FOLDER).iterdir()) == ["meta", "test", "train"]
    assert not list((own_cache / "downloads").iterdir())  # the archive was removed from the cache


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


BAD_FILES = {
    "truncated archive": (lambda p: (p / FOLDER / "train").read_bytes() and _whole(p)[:3000], ARCHIVE,
                          "truncated or corrupt"),
    "empty archive file": (lambda p: b"", ARCHIVE, "truncated or corrupt"),
    "archive of something else": (lambda p: _tar_gz({"readme.txt": b"hi"}), ARCHIVE, "does not hold"),
    "archive escaping its folder": (lambda p: _tar_gz({"../evil": b"x"}), ARCHIVE, "truncated or corrupt"),
    "a zip": (lambda p: b"PK\x03\x04" + b"\0" * 100, "cifar.zip", "not the cifar-100-python.tar.gz archive"),
    "a text file": (lambda p: b"hello", "notes.txt", "not the cifar-100-python.tar.gz archive"),
}


def _whole(parent: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(parent / FOLDER, arcname=FOLDER)
    return buf.getvalue()


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_is_one_line(parent, tmp_path, own_cache, case):
    make, name, expect = BAD_FILES[case]
    path = tmp_path / "user" / name
    path.parent.mkdir()
    path.write_bytes(make(parent))
    with pytest.raises(UserError) as err:
        load_cifar100(path, download=False)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and expect in msg, msg
    assert sorted(p.name for p in path.parent.iterdir()) == [name]
    assert not (tmp_path / "evil").exists()
    assert not [p for p in own_cache.rglob("*") if ".tmp-" in p.name]


def test_run_search_takes_the_archive_as_downloaded(parent, tmp_path):
    """Through the CLI: the archive loads (the run then stops, before Ray, at the empty validation
    split --val-fraction 0 makes, which is only checked once the data is loaded). A mistyped path
    through the CLI: test_bad_input's missing-data case."""
    archive = _archive(parent, tmp_path / ARCHIVE)
    env = {**OFFLINE, "CIFAR_TUNE_CACHE": str(tmp_path / "cache"), "RAY_TMPDIR": str(tmp_path / "ray")}
    # one image per class leaves no validation image: the search stops right after reading the data
    proc = run_cli("run_search.py", "--data-dir", archive, "--subset", 1, "--no-pretrained", "--backbones",
                   "resnet18", "--space", "tiny", "--storage-path", tmp_path / "runs", timeout=120, env=env)
    assert proc.returncode == 2 and "the validation split is empty" in proc.stderr, proc.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} <= {ARCHIVE, "cache", "runs"}  # nothing beside the archive


def _cifar10(root: Path) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in ("data_batch_1", "batches.meta", "test_batch"):
        (d / name).write_bytes(b"\x80\x04N.")
    return root


def _image_folder(root: Path, under: str = "") -> Path:
    from PIL import Image
    for cls in ("apple", "bee"):
        (root / under / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / under / cls / "0.png")
    return root


@pytest.mark.parametrize("make, says", [
    (lambda t: _cifar10(t / "data"), "holds CIFAR-10 (cifar-10-batches-py: 10 classes), not CIFAR-100"),
    (lambda t: _cifar10(t / "data") / "cifar-10-batches-py", "holds CIFAR-10 (cifar-10-batches-py: 10 classes)"),
    (lambda t: _image_folder(t / "imgs"), "holds folders of image files (an ImageFolder layout), not CIFAR-100"),
    (lambda t: _image_folder(t / "imgs", "train"), "holds folders of image files (an ImageFolder layout)"),
])
@pytest.mark.parametrize("download", [False, True])
def test_another_datasets_layout_is_named_not_downloaded_over(tmp_path, monkeypatch, own_cache, make, says, download):
    """A new user's probe: CIFAR-10 and ImageFolder folders were blamed on the network (a failed download)."""
    _offline(monkeypatch)
    folder = make(tmp_path)
    before = _snapshot(folder)
    with pytest.raises(UserError) as err:
        load_cifar100(folder, download=download)
    msg = str(err.value)
    assert "\n" not in msg and f"--data-dir {folder} {says}" in msg and "download" not in msg, msg
    assert _snapshot(folder) == before


def test_a_broken_link_is_named_as_typed(tmp_path):
    """Through the CLI, which made the path absolute by resolving the link (naming its missing target)."""
    link = tmp_path / "data"
    link.symlink_to(tmp_path / "gone")
    proc = run_cli("run_search.py", "--data-dir", link, "--no-pretrained", "--space", "tiny", "--backbones", "resnet18",
                   "--storage-path", tmp_path / "runs", timeout=120, env={**OFFLINE, "CIFAR_TUNE_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
    assert f"--data-dir {link} is neither a folder nor a file (a broken link?)" in proc.stderr


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_test_file_is_said_before_the_search(parent, tmp_path, own_cache, damage):
    """A search never reads the test file, but analyze.py tests on it after the search: a missing or
    truncated one is named before the search starts (a new user's probe found it only in analyze.py)."""
    import shutil

    from trainable.data import prepare_search_data, test_split_problem
    copy = tmp_path / "copy"
    shutil.copytree(parent, copy)
    assert test_split_problem(copy) == ""
    test = copy / FOLDER / "test"
    if damage == "missing":
        test.unlink()
    else:
        test.write_bytes(test.read_bytes()[:100])
    problem = test_split_problem(copy)
    assert str(test) in problem and ("missing" in problem or "truncated" in problem) and "\n" not in problem
    assert len(prepare_search_data(copy, subset=None, val_fraction=0.5, seed=0, download=False).train)  # still runs
