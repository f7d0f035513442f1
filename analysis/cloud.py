"""Cloud storage without Ray: what a storage URI is (any filesystem pyarrow opens), and copies between an
experiment's local folder and its URI, each bounded in time with one-line errors. run_search.py (through
search/storage.py) and analyze.py both use it."""
from __future__ import annotations

import fnmatch
import os
import sqlite3
import tempfile
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import pyarrow.fs

from trainable import atomic
from trainable.cache import cache_root
from trainable.errors import UserError

URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "mock")  # pyarrow.fs.FileSystem.from_uri's
PROBE_TIMEOUT_S = float(os.environ.get("CIFAR_TUNE_STORAGE_TIMEOUT_S", "60"))
TRANSFER_TIMEOUT_S = max(PROBE_TIMEOUT_S, 600.0)
# Ray Tune's files at the top of an experiment: never uploaded from the driver's copy (Ray's are newer)
RAY_FILES = ("experiment_state-*.json", "basic-variant-state-*.json", "search_gen_state-*.json",
             "searcher-state-*.pkl", "tuner.pkl", "trainable.pkl", ".validate_storage_marker",
             "*.lock", "*-journal", "*-wal", "*-shm", ".write-test-*", ".tmp*")
_FIXES = {
    "s3": "check the bucket name and the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws; "
          "another S3 store: add ?endpoint_override=HOST:PORT&region=...)",
    "gs": "check the bucket name and the credentials (gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS)",
    "abfs": "check the container and the Azure credentials (az login, or AZURE_STORAGE_ACCOUNT_KEY)",
    "hdfs": "check the namenode address, and that Java and libhdfs are installed (JAVA_HOME, HADOOP_HOME)",
}
_FIXES.update(gcs=_FIXES["gs"], abfss=_FIXES["abfs"], viewfs=_FIXES["hdfs"])


def is_uri(path: str) -> bool:
    """Whether `path` is a storage URI (s3://bucket/x), not a local folder or file://."""
    scheme, sep, _ = str(path).partition("://")
    return bool(scheme and sep) and scheme.lower() != "file"


def split_query(uri: str) -> tuple[str, str]:
    """('s3://b/runs', '?endpoint_override=h:9000') from 's3://b/runs?endpoint_override=h:9000' (pyarrow's options)."""
    base, sep, query = str(uri).partition("?")
    return base, sep + query


def redact(uri: str) -> str:
    """The URI to print: the values of query options that look like secrets hidden."""
    base, query = split_query(uri)
    parts = []
    for item in query[1:].split("&") if query else []:
        key, sep, value = item.partition("=")
        secret = any(w in key.lower() for w in ("secret", "token", "password", "key", "credential"))
        parts.append(f"{key}{sep}***" if secret and value and key != "endpoint_override" else item)
    return f"{base}?{'&'.join(parts)}" if parts else base


def check_uri(path: str, what: str = "--storage-path") -> str:
    """The URI without a trailing slash, if pyarrow knows its scheme and it names a bucket; else a UserError."""
    base, query = split_query(path)
    scheme, sep, rest = base.partition("://")
    scheme, rest = scheme.lower() if sep else "", rest.strip("/")
    if scheme not in URI_SCHEMES:
        raise UserError(f"{what} {redact(path)}: {scheme}:// is not a storage pyarrow knows: use "
                        f"s3://BUCKET/runs, gs://BUCKET/runs, hdfs:// or abfs://, or a folder")
    if not rest:
        raise UserError(f"{what} {redact(path)} names no bucket: write e.g. {scheme}://BUCKET/runs")
    return f"{scheme}://{rest}{query}"


def local_path(path: str) -> Path:
    """A local --storage-path (a folder or a file:// URI) as an absolute Path."""
    p = str(path)
    return Path(p[len("file://"):] if p.lower().startswith("file://") else p).expanduser().resolve()


def join(uri: str, name: str) -> str:
    """The experiment `name` inside the storage `uri`: before pyarrow's ?options."""
    base, query = split_query(uri)
    return f"{base.rstrip('/')}/{name}{query}"


def parent_and_name(path: str) -> tuple[str, str]:
    """Tune's storage_path and run name: ('s3://b/runs?opts', 'NAME') from 's3://b/runs/NAME?opts', or of a folder."""
    base, query = split_query(path) if is_uri(path) else (str(path), "")
    parent, name = base.rsplit("/", 1)
    return parent + query, name


def in_time(fn, uri: str, what: str, timeout_s: float | None = None):
    """fn(), its error one line naming the URI and the fix. pyarrow has no overall timeout (its GCS client retries
    for minutes); a daemon thread, unlike an executor's, does not hold up the exit while it hangs.
    `timeout_s`: PROBE_TIMEOUT_S by default."""
    timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowException, ...
            out["error"] = e
    thread = threading.Thread(target=run, daemon=True, name="storage-probe")
    thread.start()
    thread.join(timeout_s)
    fix = _FIXES.get(uri.partition("://")[0].lower(), "check the address and the credentials")
    if thread.is_alive():
        raise UserError(f"{what} {redact(uri)} did not answer within {timeout_s:.0f} s: {fix} "
                        f"and the network (CIFAR_TUNE_STORAGE_TIMEOUT_S waits longer)")
    error = out.get("error")
    if error is None:
        return out["value"]
    if isinstance(error, UserError):
        raise error
    if isinstance(error, ValueError):  # pyarrow's ArrowInvalid: a bad URI
        fix = "fix the URI's ?options (pyarrow.fs.FileSystem.from_uri's query parameters)"
    text = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    raise UserError(f"{what} {redact(uri)} cannot be reached ({text if len(text) <= 160 else text[:157] + '...'}): {fix}")


def check_reachable(uri: str, *, write: bool = True, what: str = "--storage-path") -> None:
    """Reach the URI before Ray starts: write and delete a small file there (`write`), or look it up."""
    def probe() -> None:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        if not write:
            fs.get_file_info(root)
            return
        fs.create_dir(root, recursive=True)
        marker = f"{root.rstrip('/')}/.write-test-{os.getpid()}"
        with fs.open_output_stream(marker):
            pass
        fs.delete_file(marker)
    in_time(probe, uri, what)


def mirror_dir(uri: str, local_dir: str = "") -> Path:
    """The driver's local copy of the experiment at the (checked) `uri`: LOCAL_DIR/NAME, else one folder per
    URI in the project's cache, CACHE/runs/SCHEME/BUCKET/PATH/NAME."""
    scheme, rest = split_query(uri)[0].split("://", 1)
    if local_dir:
        return Path(local_dir).expanduser().resolve() / rest.rsplit("/", 1)[-1]
    return (cache_root() / "runs" / scheme / Path(*[p for p in rest.split("/") if p not in ("", ".", "..")])).resolve()


def kind(rel: str) -> str:
    """What the file at `rel` in an experiment is: 'checkpoint', 'trial' (a result), 'ray' (Tune's state) or 'driver'."""
    if any(part.startswith("checkpoint_") for part in rel.split("/")):
        return "checkpoint"
    if "/" in rel:
        return "trial"
    return "ray" if any(fnmatch.fnmatch(rel, p) for p in RAY_FILES) else "driver"


def driver_files(exp: Path) -> list[Path]:
    """The driver's own files at the top of the local experiment folder (not Ray Tune's)."""
    return sorted(p for p in exp.iterdir() if p.is_file() and kind(p.name) == "driver") if exp.is_dir() else []


def upload(files: list[Path], local_root: Path, uri: str, what: str = "--storage-path") -> None:
    """Copy local `files` (under `local_root`) to the same relative paths under `uri`; a SQLite database goes
    as a snapshot through sqlite's backup API (the driver may be writing it)."""
    def copy() -> None:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        with tempfile.TemporaryDirectory() as tmp:
            for f in map(Path, files):
                src = _sqlite_snapshot(f, Path(tmp) / f.name) if f.suffix == ".db" else f
                dest = f"{root.rstrip('/')}/{f.relative_to(local_root).as_posix()}"
                pyarrow.fs.copy_files(str(src), dest, destination_filesystem=fs)
    in_time(copy, uri, what, TRANSFER_TIMEOUT_S)


def _sqlite_snapshot(db: Path, dest: Path) -> Path:
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as src, closing(sqlite3.connect(dest)) as dst:
            src.backup(dst)
        return dest
    except sqlite3.Error:  # not a database after all: the bytes as they are
        return db


def download(uri: str, local_root: Path, keep: tuple[str, ...], what: str = "--storage-path") -> list[str]:
    """Copy the files under `uri` whose `kind` (or relative path) is in `keep` to the same relative paths under
    `local_root`, each whole or not at all, but keep a local file newer than the remote; returns them.
    (pyarrow.fs.copy_files copies a whole tree: no filter, no newer-only.)"""
    def copy() -> list[str]:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        done = []
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True)):
            rel = info.path[len(root):].lstrip("/")
            if info.type != pyarrow.fs.FileType.File or (kind(rel) not in keep and rel not in keep):
                continue
            dest = Path(local_root) / rel
            mtime = info.mtime.timestamp() if info.mtime is not None else None
            if mtime is not None and dest.exists() and dest.stat().st_mtime >= mtime:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as f:
                atomic.write_bytes(dest, f.read())
            if mtime is not None:
                os.utime(dest, (mtime, mtime))
            done.append(rel)
        return done
    return in_time(copy, uri, what, TRANSFER_TIMEOUT_S)
