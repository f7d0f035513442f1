"""Where an experiment is stored: a local folder, a shared mount, or a cloud URI.

Ray Tune writes trial checkpoints from the node the trial runs on, so on a multi-node cluster the
storage must be one every node reaches (ray-project/ray#37177): a cloud URI (s3://, gs://, any
filesystem pyarrow knows) or a folder mounted at the same path on every node (NFS, ...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

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


def check_uri(path: str) -> str:
    """A storage URI pyarrow can open, without a trailing slash; else a UserError.

    Only the form is checked: reaching the bucket needs the network and credentials, which
    Ray Tune tries when it starts, with its own error.
    """
    scheme = uri_scheme(path)
    if scheme not in URI_SCHEMES:
        raise UserError(f"--storage-path {path}: {scheme}:// is not a storage pyarrow knows: use "
                        f"s3://, gs://, hdfs:// or abfs://, or a folder")
    rest = path.split("://", 1)[1].strip("/")
    if not rest:
        raise UserError(f"--storage-path {path} names no bucket: write e.g. {scheme}://BUCKET/runs")
    return f"{scheme}://{rest}"


def local_path(path: str) -> Path:
    """A local --storage-path (a folder or a file:// URI) as an absolute Path."""
    p = str(path)
    if p.lower().startswith("file://"):
        p = p[len("file://"):]
    return Path(p).expanduser().resolve()


def join(storage: str, name: str) -> str:
    """The experiment `name` inside storage `storage` (a folder or a URI), as a string."""
    return f"{storage.rstrip('/')}/{name}" if is_uri(storage) else str(local_path(storage) / name)


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
                    f"(NFS, ...) and add --storage-shared")
