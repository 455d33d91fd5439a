"""URIs for every artifact: local paths and ``s3://bucket/key`` through fsspec/s3fs.

S3 settings come from the standard AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) plus ``AWS_ENDPOINT_URL`` for an S3-compatible
server (SeaweedFS, MinIO). Ray workers inherit them only if they are set before ``ray.init``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec


def is_remote(uri: str) -> bool:
    """True for ``s3://`` (or any other ``scheme://``) URIs, False for local paths."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def _s3_options() -> dict[str, Any]:
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for ``uri``; ``path`` is what ``fs`` methods take (no scheme for s3)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        fs = fsspec.filesystem("s3", **_s3_options())
        return fs, uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return fsspec.filesystem("file"), os.path.abspath(uri)


def pyarrow_filesystem(uri: str):
    """``(pyarrow FileSystem, path)`` for readers such as Ray Data and ``pyarrow.parquet``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/``."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    """Create a folder (local) or nothing (object stores have no folders)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def open_uri(uri: str, mode: str = "rb"):
    """Open a file at ``uri``; parent folders are created for local writes."""
    fs, path = filesystem(uri)
    if "w" in mode and not is_remote(uri):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.open(path, mode)


def read_bytes(uri: str) -> bytes:
    with open_uri(uri, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    with open_uri(uri, "wb") as f:
        f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def list_files(uri: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Sorted URIs of the files under ``uri`` (recursive), keeping only ``suffixes`` if given."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        found = [path]
    else:
        found = [p for p in fs.find(path) if not fs.isdir(p)]
    prefix = "s3://" if str(uri).startswith("s3://") else ""
    keep = [p for p in found if not suffixes or p.endswith(suffixes)]
    return sorted(prefix + p for p in keep)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (recursive)."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as f:
                write_bytes(join(uri, rel), f.read())


def download_dir(uri: str, local_dir: str) -> None:
    """Copy every file under ``uri`` into ``local_dir``, keeping relative paths."""
    base = str(uri).rstrip("/")
    for file_uri in list_files(uri):
        rel = file_uri[len(base):].lstrip("/")
        dst = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as f:
            f.write(read_bytes(file_uri))
