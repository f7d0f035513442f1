"""Where a search's experiment lives: a local folder, one every node mounts, or a cloud URI (analysis/cloud.py).
Tune writes the trials to a URI itself; the driver's own files (optuna.db, settings, budget, estimate,
best_config) live in a local folder that `Place` uploads: Tune uploads only its own state folder."""
from __future__ import annotations

import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import chain, count
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from ray import tune

from analysis.cloud import (check_reachable, check_uri, download, driver_files, in_time, is_uri, join, local_path,
                            mirror_dir, redact, upload)
from analysis.command import command, shown
from analysis.experiment import SETTINGS_FILE, read_settings
from trainable import atomic
from trainable.errors import UserError


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


def can_restore(path: str) -> bool:
    """Whether `path` (a folder or a URI) holds a Tune experiment; an unreachable URI is a UserError."""
    return in_time(lambda: tune.Tuner.can_restore(path), path, "--storage-path")


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
