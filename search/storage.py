"""Where an experiment is stored: a local folder, a shared mount, or a cloud URI.

Ray Tune writes trial checkpoints from the node the trial runs on, so on a multi-node cluster the storage
must be one every node reaches (ray-project/ray#37177): a cloud URI (s3://, gs://, any filesystem pyarrow
knows) or a folder mounted at the same path on every node. With a URI, Tune writes the trials there itself;
the driver's own files (optuna.db, settings, budget, estimate, best_config) are opened before Tune's staging
folder exists and written after fit returns, so they live in a local folder that `Place` uploads.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import shlex
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Collection
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
from filelock import FileLock, Timeout

from analysis.command import command, shown
from analysis.experiment import SETTINGS_FILE, read_settings
from trainable.atomic import write_error
from trainable.cache import cache_root
from trainable.errors import UserError

# the URI schemes pyarrow.fs.FileSystem.from_uri resolves (file:// is a local path)
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "mock")
PROBE_TIMEOUT_S = float(os.environ.get("CIFAR_TUNE_STORAGE_TIMEOUT_S", "60"))
# Ray Tune's own files at the top of an experiment: never uploaded from the driver's copy (Ray's are newer)
RAY_FILES = ("experiment_state-*.json", "basic-variant-state-*.json", "search_gen_state-*.json",
             "searcher-state-*.pkl", "tuner.pkl", "trainable.pkl", ".validate_storage_marker",
             "*.lock", "*-journal", "*-wal", "*-shm", ".write-test-*", ".tmp*")
# what a search leaves in its folder once Ray has started it (the settings and estimate come before)
STARTED = ("tuner.pkl", "experiment_state-*.json", "optuna.db", "trial_*")
LOCK_FILE = ".search.lock"
_FIXES = {
    "s3": "check the bucket name and the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws; "
          "another S3 store: add ?endpoint_override=HOST:PORT&region=...)",
    "gs": "check the bucket name and the credentials (gcloud auth application-default login, or "
          "GOOGLE_APPLICATION_CREDENTIALS)",
    "abfs": "check the container and the Azure credentials (az login, or AZURE_STORAGE_ACCOUNT_KEY)",
    "hdfs": "check the namenode address, and that Java and libhdfs are installed (JAVA_HOME, HADOOP_HOME)",
}
_FIXES.update(gcs=_FIXES["gs"], abfss=_FIXES["abfs"], viewfs=_FIXES["hdfs"])


def _fix(uri: str) -> str:
    return _FIXES.get(uri_scheme(uri), "check the address and the credentials")


def uri_scheme(path: str) -> str:
    """The scheme of a storage URI ('s3' for s3://bucket/x), '' for a local path or file://."""
    scheme, sep, _ = str(path).partition("://")
    return scheme.lower() if sep and scheme.lower() != "file" else ""


def is_uri(path: str) -> bool:
    return bool(uri_scheme(path))


def split_query(uri: str) -> tuple[str, str]:
    """('s3://b/runs', '?endpoint_override=h:9000') from 's3://b/runs?endpoint_override=h:9000':
    pyarrow reads its options (region, endpoint_override, scheme, ...) from the query."""
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
    """The URI's form (`check_reachable` tries the bucket), without a trailing slash; else a UserError."""
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
    return Path(p[len("file://"):] if p.lower().startswith("file://") else p).expanduser().resolve()


def join(storage: str, name: str) -> str:
    """The experiment `name` inside storage `storage` (a folder or a URI), as a string."""
    if not is_uri(storage):
        return str(local_path(storage) / name)
    base, query = split_query(storage)  # the name goes before pyarrow's ?options
    return f"{base.rstrip('/')}/{name}{query}"


def parent_and_name(path: str) -> tuple[str, str]:
    """Tune's storage_path and run name: ('s3://b/runs?opts', 'NAME') from 's3://b/runs/NAME?opts'."""
    if not is_uri(path):
        return str(Path(path).parent), Path(path).name
    base, query = split_query(path)
    parent, name = base.rsplit("/", 1)
    return parent + query, name


def check_cluster_storage(storage_path: str, nodes: list[dict[str, Any]], shared: bool) -> str | None:
    """Can every node of the cluster (`ray.nodes()`) write to `storage_path`? A UserError for a local
    folder when alive nodes are on several machines, unless `shared`; else a line to print, or None."""
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


def storage_error(uri: str, e: BaseException, what: str = "--storage-path") -> UserError:
    """pyarrow's error reaching `uri` (first line, cut short) as one line naming the URI and the fix."""
    fix = ("fix the URI's ?options (pyarrow.fs.FileSystem.from_uri's query parameters)"
           if isinstance(e, ValueError) else _fix(uri))  # pyarrow's ArrowInvalid: a bad URI
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return UserError(f"{what} {redact(uri)} cannot be reached ({text if len(text) <= 160 else text[:157] + '...'}): {fix}")


def _in_time(fn, uri: str, what: str, timeout_s: float):
    """fn() in a daemon thread, its error as one line; a UserError after `timeout_s` (pyarrow has no
    overall timeout, and its GCS client retries for minutes without credentials or network)."""
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
        raise UserError(f"{what} {redact(uri)} did not answer within {timeout_s:.0f} s: {_fix(uri)} "
                        f"and the network (CIFAR_TUNE_STORAGE_TIMEOUT_S waits longer)")
    error = out.get("error")
    if error is not None:
        raise (error if isinstance(error, UserError) else storage_error(uri, error, what)) from None
    return out.get("value")


def check_reachable(uri: str, *, write: bool = True, what: str = "--storage-path",
                    timeout_s: float | None = None) -> None:
    """Reach the URI before Ray starts: write and delete a small file there (`write`), or look it up."""
    def probe() -> None:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        if not write:
            fs.get_file_info(root)
            return
        fs.create_dir(root, recursive=True)
        marker = f"{root.rstrip('/')}/.write-test-{os.getpid()}"
        with fs.open_output_stream(marker) as f:
            f.write(b"")
        fs.delete_file(marker)
    _in_time(probe, uri, what, PROBE_TIMEOUT_S if timeout_s is None else timeout_s)


def can_restore(path: str) -> bool:
    """Whether `path` (a folder or a URI) holds a Tune experiment; an unreachable URI is a UserError."""
    from ray import tune  # analyze.py reads storage without Ray
    try:
        return tune.Tuner.can_restore(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's OSError, ArrowException
        raise storage_error(path, e) from None


def mirror_dir(uri: str, local_dir: str = "") -> Path:
    """The driver's local copy of the experiment at `uri`: LOCAL_DIR/NAME, else one folder per URI in
    the project's cache (CACHE/runs/SCHEME/BUCKET/PATH/NAME)."""
    base, _ = split_query(check_uri(uri))
    if local_dir:
        return Path(local_dir).expanduser().resolve() / base.rsplit("/", 1)[-1]
    scheme, rest = base.split("://", 1)
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


def upload(files: list[Path], local_root: Path, uri: str, what: str = "--storage-path") -> list[str]:
    """Copy local `files` (under `local_root`) to the same relative paths under `uri`; returns them.
    A SQLite database goes as a snapshot through sqlite's backup API (the driver may be writing it)."""
    def copy() -> list[str]:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        rels = [Path(f).relative_to(local_root).as_posix() for f in files]
        for f, rel in zip(files, rels):
            with tempfile.TemporaryDirectory() as tmp:
                src = _sqlite_snapshot(Path(f), Path(tmp)) if Path(f).suffix == ".db" else Path(f)
                pyarrow.fs.copy_files(str(src), f"{root.rstrip('/')}/{rel}", destination_filesystem=fs)
        return rels
    return _in_time(copy, uri, what, max(PROBE_TIMEOUT_S, 600.0))


def _sqlite_snapshot(db: Path, tmp: Path) -> Path:
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as src, \
                closing(sqlite3.connect(tmp / db.name)) as dst:
            src.backup(dst)
        return tmp / db.name
    except sqlite3.Error:  # not a database after all: the bytes as they are
        return db


def download(uri: str, local_root: Path, keep: Collection[str], *, newer_only: bool = False,
             what: str = "--storage-path") -> list[str]:
    """Copy the files under `uri` whose `kind` (or relative path) is in `keep` to the same relative paths
    under `local_root`, each complete or not at all; with `newer_only` a local file newer than the remote
    is kept. Returns them. (pyarrow.fs.copy_files copies a whole tree: no filter, no newer-only.)"""
    def copy() -> list[str]:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        root = root.rstrip("/")
        done = []
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True)):
            rel = info.path[len(root):].lstrip("/")
            if info.type != pyarrow.fs.FileType.File or not rel or (kind(rel) not in keep and rel not in keep):
                continue
            dest = Path(local_root) / rel
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
                part.unlink(missing_ok=True)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise write_error(dest, e, info.size or 0) from None
                raise
            if mtime is not None:
                os.utime(dest, (mtime, mtime))
            done.append(rel)
        return done
    return _in_time(copy, uri, what, max(PROBE_TIMEOUT_S, 600.0))


@dataclass
class Place:
    """Where one experiment lives: the driver's local folder `exp` and, for a cloud --storage-path
    (`storage`), the URI the trials go to and the driver's files are uploaded to ('' when local)."""
    exp: Path
    uri: str = ""
    storage: str = ""
    every_s: float = 60.0  # seconds between uploads while results come in
    last_sync: float = float("-inf")

    @property
    def tune_path(self) -> str:
        """What Tune writes to and restores from."""
        return self.uri or str(self.exp)

    def settings(self) -> dict[str, str]:
        """The storage fields of search_settings.yaml: where the experiment is, and its local copy."""
        if self.uri:
            return {"storage_path": self.storage, "local_dir": str(self.exp.parent)}
        return {"storage_path": str(self.exp.parent), "local_dir": ""}

    def describe(self) -> str:
        if self.uri:
            return f"experiment: {redact(self.uri)} (the driver's files: {self.exp})"
        return f"experiment: {shown(self.exp)}\nTensorBoard: {command('tensorboard', '--logdir', self.exp)}"

    def resume_command(self) -> str:
        """The command that continues this experiment (--storage-path left out when it is the default)."""
        args: list = ["--resume", "--name", self.exp.name]
        if self.uri:
            args += ["--storage-path", self.storage]
        elif shown(self.exp.parent) != "runs":
            args += ["--storage-path", self.exp.parent]
        return command("run_search.py", *args)

    def upload(self, best_effort: bool = False) -> None:
        """The driver's files to the URI (nothing to do for a local experiment)."""
        if not self.uri:
            return
        try:
            upload(driver_files(self.exp), self.exp, self.uri)
        except UserError as e:
            if not best_effort:
                raise
            print(f"warning: could not upload the driver's files: {e}", file=sys.stderr)

    def sync(self, staging: str | None, force: bool = False) -> None:
        """Upload during the search: when the study changes (`force`: a trial started or ended, so the
        bucket's optuna.db is never older than the searcher state Tune uploads) and every `every_s`.
        After a restore Tune uploads its copies of the driver's *.json from `staging` too: refresh them."""
        if not self.uri or (not force and time.monotonic() - self.last_sync < self.every_s):
            return
        self.last_sync = time.monotonic()
        for f in driver_files(self.exp) if staging and Path(staging).is_dir() else []:
            dest = Path(staging) / f.name
            if dest.exists():
                tmp = dest.with_name(f".{dest.name}.tmp")
                shutil.copyfile(f, tmp)
                os.replace(tmp, dest)
        self.upload(best_effort=True)

    def fetch_results(self) -> None:
        """The trials' results (not checkpoints) next to the driver's files, for the export."""
        if self.uri:
            download(self.uri, self.exp, ("trial",), newer_only=True)

    def closing(self) -> str:
        return (f"uploaded to {redact(self.uri)}; analyze it there (analysis/ goes to the bucket too): "
                f"{command('analyze.py', redact(self.uri))}") if self.uri else ""


def already_there(name: str, where: str) -> str:
    """The one line refusing to start a second search in an experiment's folder."""
    return (f"--name {name}: {where} already holds a search: continue it with --resume --name {shlex.quote(name)}, "
            f"or start a new one with a fresh --name")


def open_experiment(storage_path: str, name: str, default: str, resume: bool, local_dir: str = "") -> Place:
    """The experiment STORAGE/NAME (`default` without --name), checked before Ray starts: --resume needs
    one there; a new search refuses a given --name that holds a search and makes a default one unique."""
    if resume and not name:
        raise UserError("--resume needs --name of the experiment to continue")
    if is_uri(storage_path):
        return _open_cloud(storage_path, name or default, resume, local_dir)
    storage = local_path(storage_path)
    exp = storage / (name or default)
    if resume:
        if not can_restore(str(exp)):
            raise UserError(f"--resume: no experiment at {exp}: check --name and --storage-path")
    elif not name:  # the first free one of NAME, NAME-2, NAME-3, ...
        exp = next((storage / n for n in [default, *(f"{default}-{i}" for i in range(2, 1000))]
                    if not (storage / n).exists()), None)
        if exp is None:
            raise UserError(f"{storage} holds 999 experiments named {default}*: pass --name")
    elif exp.is_dir() and any(next(exp.glob(p), None) is not None for p in STARTED):
        raise UserError(already_there(name, str(exp)))
    try:
        storage.mkdir(parents=True, exist_ok=True)
        probe = storage / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--storage-path {storage} is not writable ({e.strerror}): pick another folder") from None
    return Place(exp)


def _open_cloud(storage_path: str, name: str, resume: bool, local_dir: str) -> Place:
    """URI/NAME, reached before Ray starts, and the driver's local folder for it; --resume fetches the
    driver's files (a local copy newer than the URI's is kept) into the folder the experiment began in
    (Ray's saved searcher opens optuna.db there), read from its settings."""
    if any(c in name for c in "?#%"):  # they would change the URI's meaning
        raise UserError(f"--name {name!r}: a cloud experiment's name can't hold ?, # or %: pick another --name")
    uri = join(check_uri(storage_path), name)
    check_reachable(uri)
    local = local_dir
    if resume:
        if not can_restore(uri):
            raise UserError(f"--resume: no experiment at {redact(uri)}: check --name and --storage-path")
        if not local:
            with tempfile.TemporaryDirectory() as tmp:
                download(uri, Path(tmp), (SETTINGS_FILE,))
                local = str(read_settings(Path(tmp)).get("local_dir") or "")
    elif can_restore(uri):
        raise UserError(already_there(name, redact(uri)))
    exp = mirror_dir(uri, local)
    try:
        exp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if local_dir or not local:
            raise UserError(f"--local-dir {exp.parent} is not writable ({e.strerror}): pick another folder") from None
        print(f"warning: {exp} (where the experiment began) can't be made here ({e.strerror}); using the cache")
        exp = mirror_dir(uri, "")
        exp.mkdir(parents=True, exist_ok=True)
    if resume:
        got = download(uri, exp, ("driver",), newer_only=True)
        print(f"resume: the driver's files of {redact(uri)} are in {exp}" + (f" ({len(got)} fetched)" if got else ""))
    return Place(exp, uri, storage_path)


def claim(exp: Path) -> FileLock:
    """An exclusive lock on the experiment folder while this search runs (released when the returned
    lock is dropped or the process ends): a second search started on it at once stops in one line."""
    exp.mkdir(parents=True, exist_ok=True)
    lock = FileLock(exp / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{exp} is being run by another search right now: wait for it, or start this one "
                        f"with a fresh --name") from None
    return lock
