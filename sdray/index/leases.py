"""Version leases: how a reader that holds an index version tells ``sdray index gc`` to keep it.

A Serve shard-searcher replica (or any long-lived reader) writes one small JSON object per
version it holds, under the index root::

    ROOT/_leases/<version>/<holder>.json
        {"version", "holder", "host", "pid", "renewed_at": unix seconds, "ttl_s"}

and rewrites it every ``renew_s`` while it holds the version; it deletes it when it drops the
version. A lease is *fresh* while ``now <= renewed_at + ttl_s + clock_skew_s``: a holder that dies
without cleaning up stops protecting its versions one TTL later, and the skew margin absorbs
clocks that disagree between the holder and the machine running gc. The lease is written before
the version is loaded, so a gc that lists leases after that sees it; a gc that listed them just
before is caught by its re-check right before deleting, and by the age grace
(:class:`LeaseConfig.min_age_s`) for versions nobody has had time to lease yet.

Only plain object writes, reads, listings and deletes: the same on a local folder and on S3
(one PUT replaces an object atomically there; locally a temp file is renamed over it). A lease
object that cannot be parsed counts as fresh: when in doubt, gc keeps the version.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sdray import storage
from sdray.index import manifest as mf

LEASES = "_leases"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class LeaseConfig(BaseModel):
    """Knobs of version leases: the holder's TTL and renewal period, gc's grace and skew margin."""

    model_config = ConfigDict(extra="forbid")

    ttl_s: float = Field(300.0, gt=0, le=86_400, description="A lease protects its version this "
                         "long after its last renewal (holders that die stop protecting it then).")
    renew_s: float = Field(60.0, gt=0, le=86_400, description="How often a holder rewrites its "
                           "leases; keep it well under ttl_s.")
    clock_skew_s: float = Field(60.0, ge=0, le=86_400, description="gc treats a lease as fresh this "
                                "much longer (clocks of holders and of gc may disagree).")
    min_age_s: float = Field(900.0, ge=0, le=30 * 86_400, description="gc never deletes a version "
                             "published less than this long ago (a reader may be about to lease it).")

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> "LeaseConfig":
        if self.renew_s >= self.ttl_s:
            raise ValueError(f"renew_s ({self.renew_s}) must be < ttl_s ({self.ttl_s})")
        return self


@dataclass(frozen=True)
class Lease:
    version: str
    holder: str
    renewed_at: float
    ttl_s: float
    host: str = ""
    pid: int = 0
    readable: bool = True

    def fresh(self, now: float, clock_skew_s: float) -> bool:
        """True while the lease protects its version (an unreadable lease always does)."""
        return not self.readable or now <= self.renewed_at + self.ttl_s + clock_skew_s


def lease_uri(root: str, version: str, holder: str) -> str:
    return storage.join(root, LEASES, version, f"{_UNSAFE.sub('_', holder)[:200]}.json")


def write_lease(root: str, version: str, holder: str, ttl_s: float, now: float | None = None) -> Lease:
    """Create or renew ``holder``'s lease on ``version`` (storage errors propagate)."""
    lease = Lease(version, holder, time.time() if now is None else now, ttl_s, socket.gethostname(), os.getpid())
    body = {"version": version, "holder": holder, "host": lease.host, "pid": lease.pid,
            "renewed_at": lease.renewed_at, "ttl_s": ttl_s}
    mf.write_atomic(lease_uri(root, version, holder), json.dumps(body, sort_keys=True).encode("utf-8"))
    return lease


def release_lease(root: str, version: str, holder: str) -> None:
    """Delete ``holder``'s lease on ``version`` (absent already: nothing to do)."""
    fs, path = storage.filesystem(lease_uri(root, version, holder))
    if fs.exists(path):
        fs.rm(path)


def _parse(version: str, name: str, data: bytes) -> Lease:
    try:
        body = json.loads(data.decode("utf-8"))
        return Lease(version, str(body["holder"]), float(body["renewed_at"]), float(body["ttl_s"]),
                     str(body.get("host", "")), int(body.get("pid", 0)))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        return Lease(version, name, 0.0, 0.0, readable=False)


def read_leases(root: str, version: str | None = None) -> dict[str, list[Lease]]:
    """``{version: [leases]}`` under ``root`` (only ``version`` when given). Storage errors propagate."""
    fs, path = storage.filesystem(storage.join(root, LEASES) if version is None
                                  else storage.join(root, LEASES, version))
    fs.invalidate_cache()
    if not fs.exists(path):
        return {}
    out: dict[str, list[Lease]] = {}
    for found in fs.find(path):
        if not found.endswith(".json"):
            continue
        parts = found.rstrip("/").split("/")
        v, name = parts[-2], parts[-1][: -len(".json")]
        if version is not None and v != version:
            continue
        with fs.open(found, "rb") as f:
            out.setdefault(v, []).append(_parse(v, name, f.read()))
    return out


def fresh_holders(leases: dict[str, list[Lease]], now: float, clock_skew_s: float) -> dict[str, list[Lease]]:
    """The fresh leases per version (versions without one are left out)."""
    out = {v: [x for x in ls if x.fresh(now, clock_skew_s)] for v, ls in leases.items()}
    return {v: ls for v, ls in out.items() if ls}


def drop_leases(root: str, version: str) -> None:
    """Delete every lease object of ``version`` (gc, after deleting the version)."""
    fs, path = storage.filesystem(storage.join(root, LEASES, version))
    if fs.exists(path):
        fs.rm(path, recursive=True)


class LeaseHolder:
    """One reader's leases: :meth:`hold` before loading a version, :meth:`release` after dropping
    it, :meth:`renew` periodically (it rewrites them when ``renew_s`` has passed). Thread-safe."""

    def __init__(self, root: str, holder: str, config: LeaseConfig | None = None):
        self.root = root
        self.holder = holder
        self.config = config or LeaseConfig()
        self._renewed: dict[str, float] = {}
        self._lock = threading.Lock()

    def versions(self) -> list[str]:
        return list(self._renewed)

    def hold(self, version: str) -> None:
        with self._lock:
            write_lease(self.root, version, self.holder, self.config.ttl_s)
            self._renewed[version] = time.monotonic()

    def release(self, version: str) -> None:
        with self._lock:
            if self._renewed.pop(version, None) is not None:
                release_lease(self.root, version, self.holder)

    def renew(self, force: bool = False) -> list[str]:
        """Rewrite the leases due for renewal (all with ``force``); returns their versions."""
        done = []
        with self._lock:
            for version, last in list(self._renewed.items()):
                if force or time.monotonic() - last >= self.config.renew_s:
                    write_lease(self.root, version, self.holder, self.config.ttl_s)
                    self._renewed[version] = time.monotonic()
                    done.append(version)
        return done
