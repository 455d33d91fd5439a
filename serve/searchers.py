"""Shard-searcher deployments (``ShardSearcher0..N-1``), the board they report their versions to,
and :class:`LocalSearcher`, the same calls inside the ingress replica (``shards_in_ingress``).

A :class:`ShardSearcher` replica hosts shard group ``group`` (shard ``j`` of a version when
``j % groups == group``; :class:`~serve.shard_group.ShardGroup`). **It loads its shards in its
constructor**, so Serve routes no request to it before they are in memory (on start, scale-up and
restart alike); ``check_health`` fails if that version is lost.

Hot swap, without a request ever waiting for a load:

1. every replica polls the index's version pointer and preloads a newly published version next to
   the served one (an older one is dropped first: at most one extra version resident);
2. every replica reports the versions it holds to the :class:`VersionBoard` (a small named Ray
   actor) every heartbeat, from its own thread, so a replica stays live while it loads;
3. an ingress replica switches to the new version only when every *live* replica of every group
   (one that reported within ``3 × heartbeat``) holds it, then marks it served on the board;
4. replicas then drop versions other than the served and newest one ``retire_after_s`` after the
   switch (:attr:`~serve.config.ServeConfig.retire_after_s`: past the deadline of any request
   pinned to the old version), and a replica starting during a swap loads both the served and the
   newest version before it takes traffic.

Every replica also leases each version it holds under the index root
(:mod:`sdray.index.leases`: written before loading, renewed every ``leases.renew_s`` by its own
thread, deleted when the version is dropped), so ``sdray index gc`` never deletes a version a
replica still serves or may be asked to load, on local disk and on S3 alike.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import ray
from ray import serve

from sdray.index.leases import LeaseConfig, LeaseHolder
from serve.config import ServeConfig
from serve.shard_group import Fusion, ShardGroup, current_version, resolve_root

log = logging.getLogger("sdray.serve")
BOARD_NAMESPACE = "sdray"


@ray.remote(num_cpus=0, max_restarts=-1)
class VersionBoard:
    """Which replica of which shard group holds which index versions; which version is served."""

    def __init__(self):
        self._held: dict[tuple[int, str], tuple[list[str], float]] = {}
        self._served: str | None = None

    def report(self, group: int, replica: str, versions: list[str]) -> str | None:
        """A replica's heartbeat; returns the version the ingress serves (None before the first)."""
        self._held[(group, replica)] = (list(versions), time.time())
        return self._served

    def leave(self, group: int, replica: str) -> None:
        self._held.pop((group, replica), None)

    def served(self) -> str | None:
        return self._served

    def serve(self, version: str) -> None:
        self._served = version

    def holders(self, fresh_s: float) -> dict[int, list[list[str]]]:
        """``{group: [versions of each live replica]}`` (reported within ``fresh_s``)."""
        now = time.time()
        out: dict[int, list[list[str]]] = {}
        for (group, _), (versions, stamp) in list(self._held.items()):
            if now - stamp <= fresh_s:
                out.setdefault(group, []).append(versions)
        return out


def board_name(app_name: str, index_root: str) -> str:
    return f"{app_name}:{index_root}"[:200]


def get_board(app_name: str, index_root: str):
    """The board of this app and index (created on first use; survives its creator)."""
    return VersionBoard.options(name=board_name(app_name, index_root), namespace=BOARD_NAMESPACE,
                                lifetime="detached", get_if_exists=True).remote()


def all_hold(holders: dict[int, list[list[str]]], groups: int, version: str) -> bool:
    """True when every group has a live replica and every live replica holds ``version``."""
    return all(holders.get(g) and all(version in v for v in holders[g]) for g in range(groups))


class GroupCalls:
    """The calls the ingress makes on a shard group (``self.group``, a :class:`ShardGroup`); the
    searches run in a worker thread (FAISS and Seismic release the GIL)."""

    group: ShardGroup
    leases: LeaseHolder
    _stop: threading.Event

    def _renew_leases(self) -> None:
        """Rewrite this replica's leases every ``renew_s`` (also without hot swap polling)."""
        every = max(0.5, min(self.leases.config.renew_s / 4, 5.0))
        while not self._stop.wait(every):
            try:
                self.leases.renew()
            except Exception:  # noqa: BLE001 - retried next round; the lease lives ttl_s meanwhile
                log.exception("shard group %s: renewing index version leases failed (they expire after "
                              "%.0f s without renewal)", self.group.group, self.leases.config.ttl_s)

    async def status(self, version: str) -> dict:
        return {"loaded": self.group.loaded(version), "error": bool(self.group.error(version)),
                "versions": self.group.versions()}

    async def prepare(self, version: str) -> bool:
        await asyncio.to_thread(self.group.load, version)
        return True

    async def search(self, version: str, direction: str, dense, sparse_ids, sparse_vals, mode: str,
                     k: int, candidates: int, fusion: dict, explain: int) -> list[dict]:
        return await asyncio.to_thread(self.group.search, version, direction, dense, sparse_ids,
                                       sparse_vals, mode, k, candidates, Fusion(**fusion), explain)

    async def explain(self, version: str, direction: str, items: list[tuple[int, int]], sparse_ids,
                      sparse_vals, top: int) -> list[list]:
        return await asyncio.to_thread(self.group.explain, version, direction, items, sparse_ids,
                                       sparse_vals, top)

    async def find(self, version: str, side: str, doc_id: str) -> dict | None:
        return await asyncio.to_thread(self.group.find, version, side, doc_id)


@serve.deployment(max_ongoing_requests=64)
class ShardSearcher(GroupCalls):
    """Hosts shard group ``group`` of ``groups`` (see module docstring)."""

    def __init__(self, index: str, group: int, groups: int, poll_interval_s: float = 5.0,
                 app_name: str = "sdray", threads: int = 4, mmap: bool = True,
                 cache_dir: str | None = None, faiss_gpu: bool = False, leases: dict | None = None,
                 retire_after_s: float | None = None):
        self.root, self.pinned = resolve_root(index)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a Serve replica (unit tests)
            self.replica = f"local-{id(self)}"
        lease_cfg = LeaseConfig.model_validate(leases or {})
        self.leases = LeaseHolder(self.root, f"{app_name}-group{group}-{self.replica}", lease_cfg)
        self.group = ShardGroup(self.root, group, groups, threads=threads, mmap=mmap,
                                cache_dir=cache_dir, faiss_gpu=faiss_gpu, leases=self.leases)
        self.heartbeat_s = min(poll_interval_s, 2.0) if poll_interval_s > 0 else 0.0
        self.board = get_board(app_name, self.root) if self.heartbeat_s else None
        served = ray.get(self.board.served.remote()) if self.board is not None else None
        newest = current_version(self.root, self.pinned)
        for v in dict.fromkeys(v for v in (served, newest) if v):
            self.group.load(v)  # raises: Serve retries the replica, no traffic meanwhile
        self.group.protected = {served or newest}
        self.grace_s = retire_after_s if retire_after_s is not None else ServeConfig(
            index=index, poll_interval_s=poll_interval_s).retire_after_s
        self._served_since: tuple[str | None, float] = (served, time.monotonic())
        self._stop = threading.Event()
        threading.Thread(target=self._renew_leases, name="lease-renew", daemon=True).start()
        if self.board is not None:
            self._report()
            threading.Thread(target=self._heartbeat, name="shard-heartbeat", daemon=True).start()
            threading.Thread(target=self._poll, name="shard-poll", daemon=True).start()

    def _report(self) -> str | None:
        """One heartbeat: the versions held; returns the version the ingress serves."""
        return ray.get(self.board.report.remote(self.group.group, self.replica, self.group.versions()))

    def _heartbeat(self) -> None:
        """Report every ``heartbeat_s``, also while :meth:`_poll` loads a version: a replica that is
        loading stays live without holding the new version, so the ingress waits for it."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                served = self._report()
                if served != self._served_since[0]:
                    self._served_since = (served, time.monotonic())
            except Exception:  # noqa: BLE001 - retried at the next beat
                log.exception("shard group %s: reporting to the version board failed", self.group.group)

    def _poll(self) -> None:
        """Preload the newest version; drop replaced ones once :meth:`_retire` allows."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                newest = current_version(self.root, self.pinned)
                if not self.group.loaded(newest):
                    self.group.load(newest)
                self._retire(newest)
            except Exception:  # noqa: BLE001 - retried at the next poll; the served version stays
                log.exception("shard group %s: preloading the newest version failed", self.group.group)

    def _retire(self, newest: str) -> None:
        """Protect the served version; ``grace_s`` after it became the served one, drop the others
        but ``newest``."""
        served, since = self._served_since
        if served and self.group.loaded(served):
            self.group.protected = {served}
            if time.monotonic() - since > self.grace_s:
                self.group.keep_only({served, newest})

    def check_health(self) -> None:
        if not any(self.group.loaded(v) for v in self.group.protected):
            raise RuntimeError("the served index version is not loaded")

    def __del__(self):
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
        if getattr(self, "board", None) is not None:
            self.board.leave.remote(self.group.group, self.replica)
        if getattr(self, "group", None) is not None:
            self.group.keep_only(set())  # releases this replica's leases (failures: logged, they expire)


class LocalSearcher(GroupCalls):
    """Every shard of the index searched inside the ingress replica (``ServeConfig.shards_in_ingress``).

    The same calls as a :class:`ShardSearcher` handle, awaited directly: no handle call, no
    serialisation of the query vectors or the hits, for small deployments. It loads the served
    version in the constructor (the ingress replica is not ready before); the ingress preloads a
    new version with :meth:`prepare` before it switches and drops the old one with :meth:`retire`
    once no request can still use it.
    """

    def __init__(self, index: str, threads: int = 4, mmap: bool = True, cache_dir: str | None = None,
                 faiss_gpu: bool = False, leases: dict | None = None, holder: str = "sdray-ingress"):
        root, pinned = resolve_root(index)
        self.leases = LeaseHolder(root, holder, LeaseConfig.model_validate(leases or {}))
        self.group = ShardGroup(root, 0, 1, threads=threads, mmap=mmap, cache_dir=cache_dir,
                                faiss_gpu=faiss_gpu, leases=self.leases)
        version = current_version(root, pinned)
        self.group.load(version)  # leased first, so `sdray index gc` keeps it while served here
        self.group.protected = {version}
        self._stop = threading.Event()
        threading.Thread(target=self._renew_leases, name="lease-renew", daemon=True).start()

    def __del__(self):
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
        if getattr(self, "group", None) is not None:
            self.group.keep_only(set())  # releases the leases (failures: logged, they expire)

    def serve(self, version: str) -> None:
        """``version`` is now the served one: never evicted; older ones go on the next load."""
        self.group.protected = {version}

    def retire(self) -> None:
        """Drop every loaded version but the served one."""
        self.group.keep_only(set(self.group.protected))
