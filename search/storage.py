"""Where an experiment is stored: a local folder, one every node mounts, or a cloud URI (any filesystem pyarrow
opens). Tune writes the trials to a URI itself; the driver's own files (optuna.db, settings, budget, estimate,
best_config) live in a local folder that `Place` uploads: Tune uploads only its own state folder."""
from __future__ import annotations

import fnmatch
import os
import shlex
import sqlite3
import sys
import tempfile
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from itertools import chain, count
from pathlib import Path
from typing import Any

import pyarrow.fs
from filelock import FileLock, Timeout

from analysis.command import command, shown
from analysis.experiment import SETTINGS_FILE, read_settings
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


def check_cluster_storage(storage_path: str, nodes: list[dict[str, Any]], shared: bool) -> str | None:
    """Can every node of the cluster (`ray.nodes()`) write to `storage_path` (ray-project/ray#37177)? A UserError
    for a local folder when alive nodes are on several machines, unless `shared`; else a line to print, or None."""
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


def _in_time(fn, uri: str, what: str, timeout_s: float):
    """fn(), its error one line naming the URI and the fix. pyarrow has no overall timeout (its GCS client retries
    for minutes); a daemon thread, unlike an executor's, does not hold up the exit while it hangs."""
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
    _in_time(probe, uri, what, PROBE_TIMEOUT_S)


def can_restore(path: str) -> bool:
    """Whether `path` (a folder or a URI) holds a Tune experiment; an unreachable URI is a UserError."""
    from ray import tune  # lazy: analyze.py imports this module without Ray
    return _in_time(lambda: tune.Tuner.can_restore(path), path, "--storage-path", PROBE_TIMEOUT_S)


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
    _in_time(copy, uri, what, TRANSFER_TIMEOUT_S)


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
    return _in_time(copy, uri, what, TRANSFER_TIMEOUT_S)


@dataclass
class Place:
    """Where one experiment lives: the driver's local folder `exp` and, for a cloud --storage-path (`storage`),
    the URI the trials go to and the driver's files are uploaded to ('' when local)."""
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
        args: list[str | Path] = ["--resume", "--name", self.exp.name]
        if self.uri or shown(self.exp.parent) != "runs":  # the default --storage-path goes without saying
            args += ["--storage-path", self.storage or self.exp.parent]  # a Path is printed as `shown` prints it
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
        """Upload during the search: when the study changes (`force`: a trial started or ended, so the bucket's
        optuna.db is never older than the searcher state Tune uploads) and every `every_s`. After a restore
        Tune uploads its copies of the driver's files from `staging` too: they are refreshed first."""
        if not self.uri or (not force and time.monotonic() - self.last_sync < self.every_s):
            return
        self.last_sync = time.monotonic()
        for f in driver_files(self.exp):
            if staging and (Path(staging) / f.name).exists():
                atomic.write_bytes(Path(staging) / f.name, f.read_bytes())
        self.upload(best_effort=True)

    def fetch_results(self) -> None:
        """The trials' results (not checkpoints) next to the driver's files, for the export."""
        if self.uri:
            download(self.uri, self.exp, ("trial",))

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
        exp = next(storage / n for n in chain([default], (f"{default}-{i}" for i in count(2))) if not (storage / n).exists())
    elif can_restore(str(exp)):  # a search started there (a folder where none did is used again)
        raise UserError(already_there(name, str(exp)))
    try:
        storage.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=storage).close()  # this search can write there
    except OSError as e:
        raise UserError(f"--storage-path {storage} is not writable ({e.strerror}): pick another folder") from None
    return Place(exp)


def _open_cloud(storage_path: str, name: str, resume: bool, local_dir: str) -> Place:
    """URI/NAME, reached before Ray starts, and the driver's local folder for it. --resume fetches the driver's
    files (a local copy newer than the URI's is kept) into the folder the experiment began in, read from its
    settings."""
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
    if resume:  # and the trials' results, from which ASHA's rungs are rebuilt
        got = download(uri, exp, ("driver", "trial"))
        print(f"resume: the driver's files and trial results of {redact(uri)} are in {exp}"
              + (f" ({len(got)} fetched)" if got else ""))
    return Place(exp, uri, storage_path)


def claim(exp: Path) -> FileLock:
    """An exclusive lock on the experiment folder while this search runs (released when the returned lock is
    dropped or the process ends): a second search started on it at once stops in one line."""
    exp.mkdir(parents=True, exist_ok=True)
    lock = FileLock(exp / ".search.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{exp} is being run by another search right now: wait for it, or start this one "
                        f"with a fresh --name") from None
    return lock
