"""Shard search and exact merging for the Serve app (pure NumPy; Ray-free, unit-testable).

A :class:`ShardGroup` hosts some shards of an index (shard ``j`` of a version belongs to group
``j % n_groups``) for every version it is asked about, loading them from object storage with
:meth:`sdray.index.shard.Shard.load` (checksummed; memory-mapped where the libraries allow).
Up to ``keep_versions`` versions stay loaded (2: the one served and the one being swapped in), so
requests still running on the previous version finish after a hot swap; an older version is
dropped *before* a newer one is loaded, so at most one extra version is ever resident. The
shards of a group are searched concurrently (``threads``; FAISS and NumPy release the GIL).

Per shard and query, :meth:`ShardGroup.search` returns candidates with **both exact scores**:

* ``dense`` mode: the shard's dense top-k (its sparse score computed exactly for display);
* ``sparse`` mode: the sparse index's top-``c`` (Seismic is approximate), rescored exactly, top-k;
* ``hybrid``: the union of the dense and sparse top-``c`` (``c = max(k, candidates)``). Linear
  fusions (``raw``, ``calibrated``) are per-document, so each shard keeps only its fused top-k;
  ``rrf`` ranks and z-score normalisation are global, so the whole union comes back and
  :func:`merge` cuts it to the global top-``c`` of each index before fusing.

Union-of-top-c per shard contains the global top-c of each index, so merged dense/sparse results
equal a single-index search, and fused results equal :func:`sdray.fusion.fuse_candidates` over
the global candidate set. Ties break on ``doc_no`` (the global row), like the in-process reader.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sdray import storage
from sdray.fusion import FusionConfig, fuse_candidates
from sdray.index import manifest as mf
from sdray.index.config import IndexConfig
from sdray.index.csr import CSR
from sdray.index.leases import LeaseHolder
from sdray.index.shard import Shard

log = logging.getLogger("sdray.serve")

SIDE_FOR = {"t2i": "images", "i2t": "captions"}


@dataclass
class Fusion:
    """Resolved hybrid parameters (request > manifest > model config)."""

    method: str = "calibrated"
    w1: float = 1.0
    w2: float = 1.0
    tau: float = 0.07
    rrf_k: float = 60.0
    normalize: str | None = None

    def per_query(self) -> bool:
        """True when a document's fused score depends on the other candidates (RRF, z-score)."""
        return self.method == "rrf" or (self.method == "calibrated" and bool(self.normalize))

    def config(self) -> FusionConfig:
        return FusionConfig(method=self.method, w1=self.w1, w2=self.w2, tau=self.tau,
                            normalize=self.normalize, k_rrf=self.rrf_k)


def query_csr(ids, values, dim: int) -> CSR:
    ids = np.asarray(ids, np.int32)
    values = np.asarray(values, np.float32)
    order = np.argsort(ids, kind="stable")
    return CSR(np.array([0, len(ids)], np.int64), ids[order], values[order], dim)


def explain_rows(shard: Shard, q: CSR, rows: np.ndarray, top: int) -> list[list[tuple[int, float, float]]]:
    """Per document row: up to ``top`` ``(term id, query weight, doc weight)``, largest product first."""
    if top <= 0:
        return [[] for _ in rows]
    qdense = np.zeros(q.dim, np.float32)
    qdense[q.indices] = q.values
    out = []
    for r in rows:
        di, dv = shard.docs.row(int(r))
        qw = qdense[di]
        contrib = qw * dv
        nz = np.flatnonzero(contrib > 0)
        if len(nz) > top:
            nz = nz[np.argpartition(-contrib[nz], top - 1)[:top]]
        nz = nz[np.lexsort((di[nz], -contrib[nz]))]
        out.append([(int(di[j]), float(qw[j]), float(dv[j])) for j in nz])
    return out


def _top(scores: np.ndarray, doc_no: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best (descending score, ascending doc_no)."""
    return np.lexsort((doc_no, -scores))[:k]


def search_shard(shard: Shard, shard_no: int, dense_q: np.ndarray, sparse_q: CSR, mode: str, k: int,
                 candidates: int, fusion: Fusion, explain: int) -> dict:
    """Candidates of one shard (see module docstring) as a dict of lists."""
    n = len(shard)
    c = max(k, candidates)
    found: list[np.ndarray] = []
    if mode in ("dense", "hybrid") and n:
        _, ids = shard.search_dense(dense_q[None], min(c if mode == "hybrid" else k, n))
        found.append(ids[0][ids[0] >= 0])
    if mode in ("sparse", "hybrid") and n and sparse_q.nnz:
        _, ids = shard.search_sparse(sparse_q, min(c, n))
        found.append(ids[0][ids[0] >= 0])
    rows = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    dense = shard.score_dense(dense_q, rows) if len(rows) else np.zeros(0, np.float32)
    sparse = shard.score_sparse(sparse_q, rows) if len(rows) else np.zeros(0, np.float32)
    doc_no = shard.doc_no[rows] if len(rows) else np.zeros(0, np.int64)
    if mode == "sparse":
        keep = sparse > 0
        rows, dense, sparse, doc_no = rows[keep], dense[keep], sparse[keep], doc_no[keep]
    fused = np.zeros(len(rows), np.float64)
    if mode == "dense":
        sel = _top(dense, doc_no, k)
    elif mode == "sparse":
        sel = _top(sparse, doc_no, k)
    elif fusion.per_query():
        sel = np.arange(len(rows))
    else:
        fused = fusion.config()(dense[None].astype(np.float64), sparse[None].astype(np.float64))[0].numpy()
        sel = _top(fused, doc_no, k)
    rows = rows[sel]
    meta = shard.meta
    return {
        "shard": [shard_no] * len(rows),
        "row": rows.tolist(),
        "doc_no": doc_no[sel].tolist(),
        "dense": dense[sel].astype(float).tolist(),
        "sparse": sparse[sel].astype(float).tolist(),
        "fused": fused[sel].astype(float).tolist(),
        "id": [meta["id"][r] for r in rows],
        "image_id": [meta["image_id"][r] for r in rows],
        "caption": [meta["caption"][r] for r in rows],
        "uri": [meta["uri"][r] for r in rows],
        "explanation": explain_rows(shard, sparse_q, rows, explain),
    }


def _global_candidates(dense: np.ndarray, sparse: np.ndarray, doc_no: np.ndarray, c: int) -> np.ndarray:
    """Positions of the union of the global dense top-``c`` and sparse top-``c`` (sparse > 0)."""
    with_sparse = np.flatnonzero(sparse > 0)
    top_sparse = with_sparse[_top(sparse[with_sparse], doc_no[with_sparse], c)]
    return np.union1d(_top(dense, doc_no, c), top_sparse)


def merge(parts: list[dict], mode: str, k: int, fusion: Fusion, candidates: int) -> list[dict]:
    """Global top-k over every shard's candidates: hit dicts sorted best first."""
    cols: dict[str, list] = {}
    for p in parts:
        for key, vals in p.items():
            cols.setdefault(key, []).extend(vals)
    n = len(cols.get("doc_no", []))
    if n == 0:
        return []
    doc_no = np.asarray(cols["doc_no"], np.int64)
    dense = np.asarray(cols["dense"], np.float64)
    sparse = np.asarray(cols["sparse"], np.float64)
    if mode == "dense":
        order, score = _top(dense, doc_no, k), dense
        fused = np.asarray(cols["fused"], np.float64)
    elif mode == "sparse":
        order, score = _top(sparse, doc_no, k), sparse
        fused = np.asarray(cols["fused"], np.float64)
    else:
        if fusion.per_query():
            keep = _global_candidates(dense, sparse, doc_no, max(k, candidates))
            cols = {key: [vals[i] for i in keep] for key, vals in cols.items()}
            doc_no, dense, sparse, n = doc_no[keep], dense[keep], sparse[keep], len(keep)
        (ids, fscores), = fuse_candidates([doc_no], [dense], [sparse], method=fusion.method, k=k,
                                          w1=fusion.w1, w2=fusion.w2, tau=fusion.tau,
                                          normalize=fusion.normalize, k_rrf=fusion.rrf_k)
        pos = {int(d): i for i, d in enumerate(doc_no)}
        order = np.asarray([pos[int(d)] for d in ids], np.int64)
        fused = np.zeros(n, np.float64)
        fused[order] = fscores
        score = fused
    if mode != "hybrid":
        # what the hybrid score of these candidates is, with the same parameters (RRF: ranks
        # among the candidates returned)
        fused = fusion.config()(dense[None], sparse[None])[0].numpy()
    hits = []
    for i in order:
        hits.append({key: cols[key][i] for key in cols} | {
            "score": float(score[i]), "fused": float(fused[i])})
    return hits


class ShardGroup:
    """The shards of one group, per version, loaded on demand and kept for ``keep_versions``.

    With ``leases`` (a :class:`~sdray.index.leases.LeaseHolder`) it leases a version before
    loading it and releases the lease when it drops the version, so ``sdray index gc`` keeps
    every version held here."""

    def __init__(self, root: str, group: int, n_groups: int, keep_versions: int = 2,
                 config: IndexConfig | None = None, threads: int = 4, mmap: bool = True,
                 cache_dir: str | None = None, faiss_gpu: bool = False, leases: LeaseHolder | None = None):
        self.root = root
        self.leases = leases
        self.group = group
        self.n_groups = n_groups
        self.keep_versions = keep_versions
        self.config = config
        self.mmap = mmap
        self.cache_dir = cache_dir
        self.faiss_gpu = faiss_gpu
        self.protected: set[str] = set()  # versions never evicted (the one being served)
        self._versions: OrderedDict[str, dict[int, dict[str, Shard]]] = OrderedDict()
        self._lock = threading.Lock()
        self._errors: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix=f"group{group}")

    def shard_numbers(self, manifest: dict) -> list[int]:
        return [j for j in range(len(manifest["shards"])) if j % self.n_groups == self.group]

    def loaded(self, version: str) -> bool:
        return version in self._versions

    def error(self, version: str) -> str | None:
        return self._errors.get(version)

    def versions(self) -> list[str]:
        return list(self._versions)

    def load(self, version: str) -> dict[int, dict[str, Shard]]:
        """The shards of ``version`` hosted here (loading them once; thread-safe)."""
        got = self._versions.get(version)
        if got is not None:
            return got
        with self._lock:
            got = self._versions.get(version)
            if got is not None:
                return got
            self._evict(room_for=1)
            try:
                if self.leases is not None:
                    self.leases.hold(version)  # before reading anything: gc now keeps it
                manifest = mf.load_manifest(self.root, version)
                cfg = self.config or index_config(manifest)
                shards: dict[int, dict[str, Shard]] = {}
                for j in self.shard_numbers(manifest):
                    entry = manifest["shards"][j]
                    shards[j] = {side: self._load_side(version, entry, side, info, cfg)
                                 for side, info in entry["sides"].items()}
            except Exception as err:
                self._errors[version] = f"{type(err).__name__}: {err}"
                self._release(version)
                raise
            self._errors.pop(version, None)
            self._versions[version] = shards
            return shards

    def _load_side(self, version: str, entry: dict, side: str, info: dict, cfg: IndexConfig) -> Shard:
        uri = mf.shard_uri(self.root, version, entry["name"], side)
        shard = Shard.load(uri, cfg, expected=info, name=f"{entry['name']}/{side}", mmap=self.mmap,
                           cache_dir=self.cache_dir)
        if self.faiss_gpu:
            from sdray.index.dense import to_gpu

            shard.dense = to_gpu(shard.dense)
        return shard

    def _evict(self, room_for: int) -> None:
        """Drop the oldest unprotected versions until ``room_for`` more fit in ``keep_versions``."""
        for v in list(self._versions):
            if len(self._versions) + room_for <= self.keep_versions:
                return
            if v not in self.protected:
                del self._versions[v]
                self._release(v)

    def _release(self, version: str) -> None:
        """Release the lease of a dropped version. A failed delete is logged, not raised: the
        version is already dropped, the lease is no longer renewed and expires after its TTL."""
        if self.leases is None:
            return
        try:
            self.leases.release(version)
        except OSError as err:
            log.warning("shard group %s: could not release the lease on %s (%s); it expires in %.0f s",
                        self.group, version, err, self.leases.config.ttl_s)

    def keep_only(self, versions: set[str]) -> None:
        """Drop every loaded version not in ``versions`` (after a swap has finished)."""
        with self._lock:
            for v in [v for v in self._versions if v not in versions]:
                del self._versions[v]
                self._release(v)

    def search(self, version: str, direction: str, dense_q, sparse_ids, sparse_vals, mode: str, k: int,
               candidates: int, fusion: Fusion, explain: int) -> list[dict]:
        shards = self.load(version)
        side = SIDE_FOR[direction]
        dense_q = np.asarray(dense_q, np.float32)
        todo = [(j, sides[side]) for j, sides in shards.items() if side in sides]

        def one(item):
            j, shard = item
            q = query_csr(sparse_ids, sparse_vals, shard.docs.dim)
            return search_shard(shard, j, dense_q, q, mode, k, candidates, fusion, explain)

        if len(todo) <= 1:
            return [one(t) for t in todo]
        return list(self._pool.map(one, todo))

    def explain(self, version: str, direction: str, items: list[tuple[int, int]], sparse_ids,
                sparse_vals, top: int) -> list[list[tuple[int, float, float]]]:
        """Explanations of ``(shard number, row)`` hits of this group."""
        shards = self.load(version)
        side = SIDE_FOR[direction]
        out = []
        for j, row in items:
            shard = shards[int(j)][side]
            q = query_csr(sparse_ids, sparse_vals, shard.docs.dim)
            out.append(explain_rows(shard, q, np.asarray([row]), top)[0])
        return out

    def find(self, version: str, side: str, doc_id: str) -> dict | None:
        """Metadata of a document by id (for the image route)."""
        for j, sides in self.load(version).items():
            shard = sides.get(side)
            if shard is None:
                continue
            idx = _id_index(shard)
            r = idx.get(doc_id)
            if r is not None:
                return shard.row_meta(r) | {"shard": j}
        return None


def index_config(manifest: dict) -> IndexConfig:
    """The :class:`IndexConfig` a manifest was built with (default when absent or unreadable)."""
    raw = manifest.get("config") or {}
    raw = raw.get("index", raw) if isinstance(raw, dict) else {}
    try:
        return IndexConfig.model_validate(raw)
    except Exception:
        return IndexConfig()


def _id_index(shard: Shard) -> dict[str, int]:
    idx = getattr(shard, "_sdray_id_index", None)
    if idx is None:
        idx = {str(v): i for i, v in enumerate(shard.meta["id"])}
        for i, v in enumerate(shard.meta.get("image_id") or []):
            if v is not None:
                idx.setdefault(str(v), i)
        shard._sdray_id_index = idx
    return idx


def served_manifest(cfg) -> dict:
    """The manifest of the index version ``cfg`` (a :class:`~serve.config.ServeConfig`) serves."""
    root, pinned = resolve_root(cfg.index)
    return mf.load_manifest(root, pinned)


def model_uri(cfg) -> str:
    """The query encoder's model: ``cfg.model``, else the one the served manifest names."""
    if cfg.model:
        return cfg.model
    uri = served_manifest(cfg).get("model")
    if not uri:
        raise ValueError(f"the index at {cfg.index} names no model; pass --model")
    return uri


def resolve_root(uri: str) -> tuple[str, str | None]:
    """``(root, pinned version or None)`` of an index URI (root or one version folder)."""
    return mf.index_root(uri)


def current_version(root: str, pinned: str | None) -> str:
    if pinned:
        return pinned
    v = mf.current_version(root)
    if v is None:
        raise FileNotFoundError(f"{storage.join(root, mf.POINTER)}: no published index")
    return v


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
