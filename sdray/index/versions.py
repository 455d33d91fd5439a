"""Index lifecycle on an index root (local or ``s3://``): list versions, roll back, collect garbage.

Layout: :mod:`sdray.index.manifest`. A *published* version has ``V/manifest.json``; a *partial*
one is a version folder without it (an interrupted or running build). ``CURRENT.json`` names the
version readers (``Retriever.load``, the Serve app's poller) use; ``_building.json`` names the
version a build is writing (resumable).

- :func:`list_versions`: every version, newest first, with its state and counts.
- :func:`rollback`: point ``CURRENT.json`` at an older published version, atomically, exactly as
  a publish does (same pointer format: version + the manifest's sha256), so a running
  ``sdray serve`` picks it up at its next poll like any new version.
- :func:`gc`: delete all but the ``keep`` newest published versions and abandoned partial ones;
  never the current version nor the one ``_building.json`` names, nor a version a reader holds
  a fresh lease on (a Serve replica still serving it after a rollback or publish, a pinned
  deployment; :mod:`sdray.index.leases`), nor one younger than ``LeaseConfig.min_age_s``. Just
  before deleting a version it re-reads the pointer, the build marker and that version's
  leases; it deletes the manifest first (readers then see an unpublished version, not a torn
  one), then the folder, then the version's leases.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import time
from dataclasses import asdict, dataclass, field

from sdray import storage
from sdray.index import manifest as mf
from sdray.index.leases import LeaseConfig, drop_leases, fresh_holders, read_leases
from sdray.index.shard import IndexFileError, read_index_json, sha256

VERSION_RE = re.compile(r"^v\d{8}T\d{6}Z-[0-9a-f]+$")


@dataclass
class VersionInfo:
    version: str
    state: str            # "published" | "partial"
    current: bool
    building: bool
    created: str | None = None
    counts: dict | None = None
    model: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _building_version(root: str) -> str | None:
    uri = storage.join(root, mf.BUILDING)
    if not storage.exists(uri):
        return None
    try:
        return storage.read_json(uri).get("version")
    except ValueError as err:
        raise IndexFileError(f"{uri}: unreadable build marker ({err}); remove it if no build runs") from err


def _version_names(root: str) -> list[str]:
    fs, path = storage.filesystem(root)
    fs.invalidate_cache()  # s3fs caches listings; versions come and go under other writers
    if not fs.exists(path):
        raise FileNotFoundError(f"{root}: no index root here")
    names = []
    for entry in fs.ls(path, detail=True, refresh=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") == "directory" and VERSION_RE.match(name):
            names.append(name)
    return sorted(names, reverse=True)


def _has_objects(root: str, name: str) -> bool:
    fs, path = storage.filesystem(root)
    prefix = f"{path}/{name}"
    return any(found.rstrip("/") != prefix for found in fs.find(prefix))


def list_versions(root: str) -> list[VersionInfo]:
    """Every version folder under ``root``, newest first (names sort by creation time)."""
    current = mf.current_version(root)
    building = _building_version(root)
    out = []
    for name in _version_names(root):
        info = VersionInfo(name, "partial", name == current, name == building)
        uri = storage.join(root, name, mf.MANIFEST)
        if storage.exists(uri):
            manifest = read_index_json(uri)
            info.state = "published"
            info.created = manifest.get("created")
            info.counts = {s: v.get("count") for s, v in (manifest.get("sides") or {}).items()}
            info.model = manifest.get("model")
        elif not _has_objects(root, name):
            continue  # an empty prefix left behind by a deletion (some S3 servers list those)
        out.append(info)
    return out


def rollback(root: str, version: str) -> dict:
    """Make ``version`` (published) current; returns the new pointer."""
    uri = storage.join(root, version, mf.MANIFEST)
    if not storage.exists(uri):
        raise IndexFileError(f"{root}: version {version} is not a published version (no {mf.MANIFEST})")
    data = storage.read_bytes(uri)
    try:
        json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise IndexFileError(f"{uri}: corrupted manifest ({err})") from err
    pointer = {"version": version, "manifest_sha256": sha256(data)}
    mf.write_atomic(storage.join(root, mf.POINTER), json.dumps(pointer, sort_keys=True).encode("utf-8"))
    return pointer


def plan_gc(versions: list[VersionInfo], keep: int) -> list[str]:
    """Versions :func:`gc` would delete: published ones past the ``keep`` newest, and partial
    ones, except the current and the building version."""
    if keep < 1:
        raise ValueError(f"--keep must be >= 1, got {keep}")
    published = [v for v in versions if v.state == "published"]
    kept = {v.version for v in published[:keep]}
    return [v.version for v in versions
            if not (v.current or v.building or v.version in kept)]


@dataclass
class GcResult:
    """What :func:`gc` deleted (or would delete, dry run) and what it kept past ``keep``, and why."""

    deleted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def _created_at(info: VersionInfo) -> float:
    """Unix time a version was published (manifest ``created``), else when its build started
    (the name's timestamp)."""
    if info.created:
        try:
            return _dt.datetime.fromisoformat(info.created).timestamp()
        except ValueError as err:
            raise IndexFileError(f"{info.version}: unreadable manifest 'created' ({info.created!r})") from err
    stamp = _dt.datetime.strptime(info.version[1:16], "%Y%m%dT%H%M%S")
    return stamp.replace(tzinfo=_dt.timezone.utc).timestamp()


def _why_kept(info: VersionInfo, leases: list, now: float, cfg: LeaseConfig) -> str | None:
    if leases:
        holders = ", ".join(sorted(x.holder for x in leases)[:3]) + (" ..." if len(leases) > 3 else "")
        return f"leased by {len(leases)} reader(s): {holders}"
    age = now - _created_at(info)
    if age < cfg.min_age_s:
        return f"{age:.0f} s old, younger than min_age_s={cfg.min_age_s:.0f}"
    return None


def gc(root: str, keep: int, dry_run: bool = False, config: LeaseConfig | None = None,
       now: float | None = None) -> GcResult:
    """Delete what :func:`plan_gc` selects, except versions a fresh lease or the age grace
    protects (nothing when ``dry_run``). ``now``: unix time (tests)."""
    cfg = config or LeaseConfig()
    clock = (lambda: now) if now is not None else time.time
    versions = {v.version: v for v in list_versions(root)}
    held = fresh_holders(read_leases(root), clock(), cfg.clock_skew_s)
    result = GcResult()
    doomed = []
    for name in plan_gc(list(versions.values()), keep):
        why = _why_kept(versions[name], held.get(name, []), clock(), cfg)
        if why:
            result.kept[name] = why
        else:
            doomed.append(name)
    if dry_run:
        result.deleted = doomed
        return result
    fs, path = storage.filesystem(root)
    for name in doomed:
        # re-read just before deleting: a build may have started, a rollback or a reader come in
        if name in (_building_version(root), mf.current_version(root)):
            result.kept[name] = "became current or building during gc"
            continue
        why = _why_kept(versions[name], fresh_holders(read_leases(root, name), clock(), cfg.clock_skew_s)
                        .get(name, []), clock(), cfg)
        if why:
            result.kept[name] = why
            continue
        manifest = f"{path}/{name}/{mf.MANIFEST}"
        if fs.exists(manifest):
            fs.rm(manifest)
        fs.rm(f"{path}/{name}", recursive=True)
        drop_leases(root, name)
        result.deleted.append(name)
    fs.invalidate_cache()
    return result
