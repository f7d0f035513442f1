"""Where an experiment is stored: a local folder, a shared mount, or a cloud URI.

Ray Tune writes trial checkpoints from the node the trial runs on, so on a multi-node cluster the
storage must be one every node reaches (ray-project/ray#37177): a cloud URI (s3://, gs://, any
filesystem pyarrow knows) or a folder mounted at the same path on every node (NFS, ...).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from trainable.atomic import write_error
from trainable.cache import cache_root
from trainable.errors import UserError

# the URI schemes pyarrow.fs.FileSystem.from_uri resolves (file:// is a local path)
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "mock")


def uri_scheme(path: str) -> str:
    """The scheme of a storage URI ('s3' for s3://bucket/x), '' for a local path or file://."""
    scheme, sep, _ = str(path).partition("://")
    if not sep or scheme.lower() == "file":
        return ""
    return scheme.lower()


def is_uri(path: str) -> bool:
    """True when `path` names remote storage (s3://, gs://, ...) rather than a local folder."""
    return bool(uri_scheme(path))


def split_query(uri: str) -> tuple[str, str]:
    """('s3://b/runs', '?endpoint_override=h:9000') from 's3://b/runs?endpoint_override=h:9000':
    pyarrow reads its options (region, endpoint_override, scheme, ...) from the query."""
    base, sep, query = str(uri).partition("?")
    return base, sep + query


def redact(uri: str) -> str:
    """The URI to print: the values of query options that look like secrets hidden."""
    base, query = split_query(uri)
    if not query:
        return base
    parts = []
    for item in query[1:].split("&"):
        key, sep, value = item.partition("=")
        secret = any(w in key.lower() for w in ("secret", "token", "password", "key", "credential"))
        parts.append(f"{key}{sep}***" if secret and value and key != "endpoint_override" else item)
    return f"{base}?{'&'.join(parts)}"


def check_uri(path: str, what: str = "--storage-path") -> str:
    """A storage URI pyarrow can open, without a trailing slash (its ?options kept); else a UserError.

    Only the form is checked here; `check_reachable` tries the bucket.
    """
    scheme = uri_scheme(path)
    if scheme not in URI_SCHEMES:
        raise UserError(f"{what} {redact(path)}: {scheme}:// is not a storage pyarrow knows: use "
                        f"s3://BUCKET/runs, gs://BUCKET/runs, hdfs:// or abfs://, or a folder")
    base, query = split_query(path)
    rest = base.split("://", 1)[1].strip("/")
    if not rest:
        raise UserError(f"{what} {redact(path)} names no bucket: write e.g. {scheme}://BUCKET/runs")
    return f"{scheme}://{rest}{query}"


def local_path(path: str) -> Path:
    """A local --storage-path (a folder or a file:// URI) as an absolute Path."""
    p = str(path)
    if p.lower().startswith("file://"):
        p = p[len("file://"):]
    return Path(p).expanduser().resolve()


def join(storage: str, name: str) -> str:
    """The experiment `name` inside storage `storage` (a folder or a URI), as a string."""
    if not is_uri(storage):
        return str(local_path(storage) / name)
    base, query = split_query(storage)  # the name goes before pyarrow's ?options
    return f"{base.rstrip('/')}/{name}{query}"


def filesystem_and_path(path: str) -> tuple[Any, str]:
    """The pyarrow filesystem and the path on it, for a local folder or a URI (as Ray Tune
    resolves its storage_path)."""
    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(local_path(path))


def check_cluster_storage(storage_path: str, nodes: list[dict[str, Any]], shared: bool) -> str | None:
    """Can every node of the cluster write to `storage_path`? `nodes` is `ray.nodes()`.

    Raises a UserError for a local folder on a cluster whose alive nodes are on several machines
    unless `shared`
    (the user says the folder is mounted on every node); returns a line to print, or None.
    """
    # Ray nodes on one machine (ray.cluster_utils, several raylets a host) share its folders
    alive = len({n.get("NodeManagerAddress") or n.get("NodeID") for n in nodes if n.get("Alive")})
    if alive <= 1 or is_uri(storage_path):
        return None
    if shared:
        return (f"storage: {local_path(storage_path)} is taken to be shared by the nodes of all {alive} machines "
                f"(--storage-shared)")
    raise UserError(f"--storage-path {local_path(storage_path)} is a folder of this node only, but the "
                    f"cluster has nodes on {alive} machines: use a folder every node mounts at the same path "
                    f"(NFS, ...) and add --storage-shared, or a cloud URI (s3://BUCKET/runs, gs://BUCKET/runs)")


# --- cloud storage: reaching it, and the driver's local copy of an experiment -------------------
#
# Ray Tune writes trial results and checkpoints to a URI itself (RunConfig.storage_path, through
# pyarrow), and syncs its own experiment state from a staging folder it makes inside Tuner.fit.
# The driver's files (optuna.db, search_settings.yaml, budget.json, estimate.json, best_config.*)
# are opened before that folder exists and written after fit returns, so they live in a local
# mirror of the experiment and are uploaded here: periodically, when the search ends, on errors.

PROBE_TIMEOUT_S = float(os.environ.get("CIFAR_TUNE_STORAGE_TIMEOUT_S", "60"))
# Ray Tune's own files at the top of an experiment: never uploaded from the mirror (Ray's are newer)
RAY_FILES = ("experiment_state-*.json", "basic-variant-state-*.json", "search_gen_state-*.json",
             "searcher-state-*.pkl", "tuner.pkl", "trainable.pkl", ".validate_storage_marker",
             "*.lock", "*-journal", "*-wal", "*-shm", ".write-test-*", ".tmp*")

_FIXES = {
    "s3": "check the bucket name and the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws; "
          "another S3 store: add ?endpoint_override=HOST:PORT&region=...)",
    "gs": "check the bucket name and the credentials (gcloud auth application-default login, or "
          "GOOGLE_APPLICATION_CREDENTIALS)",
    "abfs": "check the container and the Azure credentials (az login, or AZURE_STORAGE_ACCOUNT_KEY)",
    "hdfs": "check the namenode address, and that Java and libhdfs are installed (JAVA_HOME, HADOOP_HOME)",
}


def _fix(scheme: str) -> str:
    key = {"gcs": "gs", "abfss": "abfs", "viewfs": "hdfs"}.get(scheme, scheme)
    return _FIXES.get(key, "check the address and the credentials")


def _short(e: BaseException) -> str:
    """pyarrow's message, first line, cut short (its errors run to many lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def storage_error(uri: str, e: BaseException, what: str = "--storage-path") -> UserError:
    """pyarrow's error reaching `uri` as one line naming the URI and the fix."""
    fix = ("fix the URI's ?options (pyarrow.fs.FileSystem.from_uri's query parameters)"
           if isinstance(e, ValueError) else _fix(uri_scheme(uri)))  # pyarrow's ArrowInvalid: a bad URI
    return UserError(f"{what} {redact(uri)} cannot be reached ({_short(e)}): {fix}")


def _with_timeout(fn, uri: str, what: str, timeout_s: float):
    """fn() in a thread; a UserError when it raises or takes longer than `timeout_s` (pyarrow's GCS
    client retries for minutes without credentials or network)."""
    import threading

    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowException, ...
            out["error"] = e
    t = threading.Thread(target=run, daemon=True, name="storage-probe")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise UserError(f"{what} {redact(uri)} did not answer within {timeout_s:.0f} s: {_fix(uri_scheme(uri))} "
                        f"and the network (CIFAR_TUNE_STORAGE_TIMEOUT_S waits longer)")
    if "error" in out:
        e = out["error"]
        if isinstance(e, UserError):
            raise e
        raise storage_error(uri, e, what) from None
    return out.get("value")


def check_reachable(uri: str, *, write: bool = True, what: str = "--storage-path",
                    timeout_s: float | None = None) -> None:
    """Reach the URI now, before Ray starts: create the folder and write and delete a small file
    (`write`), or only look it up; a one-line UserError naming the URI and the fix otherwise."""
    def probe() -> None:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        if not write:
            fs.get_file_info(root)
            return
        fs.create_dir(root, recursive=True)
        marker = f"{root.rstrip('/')}/.write-test-{os.getpid()}"
        with fs.open_output_stream(marker) as f:
            f.write(b"")
        fs.delete_file(marker)
    _with_timeout(probe, uri, what, PROBE_TIMEOUT_S if timeout_s is None else timeout_s)


def mirror_dir(uri: str, local_dir: str = "") -> Path:
    """The local folder holding the driver's copy of the experiment at `uri` (STORAGE/NAME):
    LOCAL_DIR/NAME with --local-dir, else CACHE/runs/SCHEME/BUCKET/PATH/NAME in the project's cache
    (CIFAR_TUNE_CACHE, default ~/.cache/cifar-tune), one folder per URI."""
    base, _ = split_query(check_uri(uri))
    if local_dir:
        return Path(local_dir).expanduser().resolve() / base.rsplit("/", 1)[-1]
    scheme, rest = base.split("://", 1)
    return (cache_root() / "runs" / scheme / Path(*[p for p in rest.split("/") if p not in ("", ".", "..")])).resolve()


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    import fnmatch
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def driver_files(exp: Path) -> list[Path]:
    """The driver's own files at the top of the local experiment folder (not Ray Tune's)."""
    exp = Path(exp)
    return sorted(p for p in exp.iterdir() if p.is_file() and not _matches(p.name, RAY_FILES)) if exp.is_dir() else []


def upload(files: list[Path], local_root: Path, uri: str, what: str = "--storage-path") -> list[str]:
    """Copy local `files` (under `local_root`) to the same relative paths under `uri`; returns them.

    SQLite databases are copied through sqlite's backup API, so a database the driver is writing
    is uploaded as a consistent snapshot."""
    import shutil
    import tempfile

    local_root = Path(local_root)

    def copy() -> list[str]:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        root = root.rstrip("/")
        done = []
        made: set[str] = set()
        for f in files:
            rel = Path(f).relative_to(local_root).as_posix()
            dest = f"{root}/{rel}"
            parent = dest.rsplit("/", 1)[0]
            if parent not in made:
                fs.create_dir(parent, recursive=True)
                made.add(parent)
            with tempfile.TemporaryDirectory() as tmp:
                src = _sqlite_snapshot(Path(f), Path(tmp)) if Path(f).suffix == ".db" else Path(f)
                with open(src, "rb") as fin, fs.open_output_stream(dest) as fout:
                    shutil.copyfileobj(fin, fout, 8 << 20)
            done.append(rel)
        return done
    return _with_timeout(copy, uri, what, max(PROBE_TIMEOUT_S, 600.0))


def _sqlite_snapshot(db: Path, tmp: Path) -> Path:
    import sqlite3

    out = tmp / db.name
    try:
        src = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(out)
            with dst:
                src.backup(dst)
            dst.close()
        finally:
            src.close()
        return out
    except sqlite3.Error:  # not a database after all: the bytes as they are
        return db


def download(uri: str, local_root: Path, *, skip=None, newer_only: bool = False,
             what: str = "--storage-path") -> list[str]:
    """Copy every file under `uri` to the same relative path under `local_root`, except those whose
    relative path `skip(rel)` rejects; with `newer_only`, a local file newer than its remote copy is
    kept. Returns the relative paths copied; [] when nothing is there."""
    import shutil

    local_root = Path(local_root)

    def copy() -> list[str]:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        root = root.rstrip("/")
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
        done = []
        for info in infos:
            if info.type != pyarrow.fs.FileType.File:
                continue
            rel = info.path[len(root):].lstrip("/")
            if not rel or (skip is not None and skip(rel)):
                continue
            dest = local_root / rel
            mtime = info.mtime.timestamp() if info.mtime is not None else None
            if newer_only and dest.exists() and mtime is not None and dest.stat().st_mtime >= mtime:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(f".{dest.name}.part")
            try:
                with fs.open_input_stream(info.path) as fin, open(part, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 8 << 20)
                part.replace(dest)
            except OSError as e:
                part.unlink(missing_ok=True)  # no half-fetched file left behind
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise write_error(dest, e, info.size or 0) from None
                raise
            if mtime is not None:
                os.utime(dest, (mtime, mtime))
            done.append(rel)
        return done
    return _with_timeout(copy, uri, what, max(PROBE_TIMEOUT_S, 600.0))


def no_checkpoints(rel: str) -> bool:
    """`skip` for `download`: trial checkpoints (analysis retrains; it reads results only)."""
    return any(part.startswith("checkpoint_") for part in rel.split("/"))


def top_level_driver_file(rel: str) -> bool:
    """`skip` for `download` keeping only the driver's files at the top of the experiment."""
    return "/" in rel or _matches(rel, RAY_FILES)


def results_only(rel: str) -> bool:
    """`skip` for `download` of a whole experiment: trial checkpoints (analysis retrains, it reads
    results only) and Ray Tune's own state at the top."""
    return no_checkpoints(rel) or ("/" not in rel and _matches(rel, RAY_FILES))
