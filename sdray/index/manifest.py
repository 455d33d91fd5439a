"""Versioned index layout on any URI, checksummed manifest and atomic publish.

::

    OUT/CURRENT.json                       {"version": V, "manifest_sha256": ...}  written last
    OUT/_building.json                     {"version": V, "fingerprint": ...}      while a build runs
    OUT/V/manifest.json                    model, config, counts, dims, shards and file checksums
    OUT/V/vocab.json                       term id -> word piece (optional; for explanations)
    OUT/V/shard-00000/images/...           one shard side (see sdray.index.shard)
    OUT/V/shard-00000/captions/...

A reader resolves ``CURRENT.json`` (one object, replaced atomically: ``os.replace`` locally, a
single PUT on S3) and then only reads files of that version, so it sees the old index or the new
one, never a mix. A build writes a new version folder and publishes last; an interrupted build
leaves ``CURRENT.json`` untouched, and re-running the build with the same inputs resumes the
pending version (shards whose ``shard.json`` exists are kept).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import secrets
import tempfile
from typing import Any

from sdray import storage
from sdray.index.shard import SHARD_JSON, IndexFileError, read_index_json, sha256

log = logging.getLogger(__name__)

POINTER = "CURRENT.json"
BUILDING = "_building.json"
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
FORMAT = 1


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def new_version() -> str:
    """A sortable, unique version name: ``vYYYYmmddTHHMMSSZ-<hex>``."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"v{now}-{secrets.token_hex(3)}"


def version_uri(out: str, version: str) -> str:
    return storage.join(out, version)


def shard_uri(out: str, version: str, shard: int | str, side: str) -> str:
    name = shard if isinstance(shard, str) else shard_name(shard)
    return storage.join(out, version, name, side)


def fingerprint(obj: Any) -> str:
    """A stable hash of build inputs (model URI, corpus URI, config, shard count ...)."""
    return sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8"))[:16]


def write_atomic(uri: str, data: bytes) -> None:
    """Replace the object at ``uri`` in one step (temp file + ``os.replace`` locally, one PUT on
    S3, retried as :func:`sdray.storage.write_bytes` says)."""
    if storage.is_remote(uri):
        storage.write_bytes(uri, data)
        return
    _, path = storage.filesystem(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- build bookkeeping ------------------------------------------------------------------------
def begin_build(out: str, fp: str, version: str | None = None) -> tuple[str, bool]:
    """The version to build into, and whether it resumes an interrupted build with the same inputs."""
    marker = storage.join(out, BUILDING)
    if version is None and storage.exists(marker):
        try:
            pending = storage.read_json(marker)
        except ValueError:              # a corrupt marker: start a new version (a storage fault raises)
            pending = {}
        if pending.get("fingerprint") == fp and pending.get("version"):
            return pending["version"], True
    resumed = version is not None and storage.exists(storage.join(out, version))
    version = version or new_version()
    write_atomic(marker, json.dumps({"version": version, "fingerprint": fp}).encode())
    return version, resumed


def shard_done(out: str, version: str, shard: int, sides: tuple[str, ...]) -> dict[str, dict] | None:
    """The ``shard.json`` of every side when the shard is complete, else None."""
    infos = {}
    for side in sides:
        uri = storage.join(shard_uri(out, version, shard, side), SHARD_JSON)
        if not storage.exists(uri):
            return None
        try:
            infos[side] = storage.read_json(uri)
        except ValueError:              # a corrupt shard.json: rebuild the shard (a storage fault raises)
            return None
    return infos


def make_manifest(
    version: str,
    shard_infos: list[dict[str, dict]],
    *,
    model: str | None = None,
    config: dict | None = None,
    fusion: dict | None = None,
    has_vocab: bool = False,
    extra: dict | None = None,
) -> dict:
    """Manifest content from each shard's per-side ``shard.json``."""
    sides = sorted({side for info in shard_infos for side in info})
    first = next((i[s] for i in shard_infos for s in i), {})
    manifest = {
        "format": FORMAT,
        "version": version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "model": model,
        "config": config or {},
        "fusion": fusion or {},
        "dense_dim": first.get("dense_dim"),
        "vocab_size": first.get("vocab_size"),
        "vocab": VOCAB if has_vocab else None,
        "sides": {s: {"count": sum(i[s]["count"] for i in shard_infos if s in i)} for s in sides},
        "shards": [{"name": shard_name(n), "sides": info} for n, info in enumerate(shard_infos)],
    }
    manifest.update(extra or {})
    return manifest


def publish(out: str, version: str, manifest: dict) -> None:
    """Write the manifest, then the pointer (last), then drop the build marker."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    write_atomic(storage.join(out, version, MANIFEST), data)
    pointer = {"version": version, "manifest_sha256": sha256(data)}
    write_atomic(storage.join(out, POINTER), json.dumps(pointer, sort_keys=True).encode("utf-8"))
    marker = storage.join(out, BUILDING)
    try:
        fs, path = storage.filesystem(marker)
        if fs.exists(path):
            fs.rm(path)
    except OSError as err:   # published already; a marker left behind only makes the next
        # build with the same inputs republish this version
        log.warning("published %s, but the build marker %s could not be removed (%s)", version, marker, err)


def current_version(out: str) -> str | None:
    uri = storage.join(out, POINTER)
    if not storage.exists(uri):
        return None
    return read_index_json(uri)["version"]


def load_manifest(out: str, version: str | None = None) -> dict:
    """The manifest of ``version`` (default: the published one), checked against the pointer."""
    pointer_uri = storage.join(out, POINTER)
    expected_sha = None
    if version is None:
        if not storage.exists(pointer_uri):
            if storage.exists(storage.join(out, MANIFEST)):  # a version folder given directly
                return read_index_json(storage.join(out, MANIFEST))
            raise IndexFileError(f"{pointer_uri}: no published index here (missing pointer)")
        pointer = read_index_json(pointer_uri)
        version, expected_sha = pointer.get("version"), pointer.get("manifest_sha256")
        if not version:
            raise IndexFileError(f"{pointer_uri}: corrupted pointer (no version)")
    uri = storage.join(out, version, MANIFEST)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as err:
        raise IndexFileError(f"{uri}: missing manifest") from err
    if expected_sha and sha256(data) != expected_sha:
        raise IndexFileError(f"{uri}: corrupted manifest (sha256 differs from {pointer_uri})")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise IndexFileError(f"{uri}: corrupted manifest ({err})") from err
    manifest.setdefault("version", version)
    return manifest


def index_root(uri: str) -> tuple[str, str | None]:
    """``(OUT, version)`` for either ``OUT`` (published version) or ``OUT/<version>``."""
    if storage.exists(storage.join(uri, POINTER)):
        return uri, None
    if storage.exists(storage.join(uri, MANIFEST)):
        base = str(uri).rstrip("/")
        return base.rsplit("/", 1)[0], base.rsplit("/", 1)[1]
    return uri, None
