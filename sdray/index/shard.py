"""One index shard (one corpus side): dense FAISS index, sparse index, stored sparse vectors, metadata.

Files under ``<shard>/<side>/`` (side = ``images`` or ``captions``)::

    dense.faiss          faiss.serialize_index bytes (flat / ivf / hnsw; holds the float32 vectors)
    sparse.seismic       Seismic's own format (absent when the shard uses the exact scorer)
    sparse.indptr.npy    CSR of the stored sparse vectors (exact rescoring, explanations, fallback)
    sparse.indices.npy
    sparse.values.npy
    meta.parquet         id, image_id, caption, uri, url, image_loc, doc_no (global row, the tie-break)
    shard.json           counts, dims and {file: {sha256, bytes}}; written last = shard complete

No pickle anywhere: ``.npy`` is read with ``allow_pickle=False``.

:meth:`Shard.load` with ``mmap=True`` memory-maps what the libraries allow instead of reading it
into the process: the FAISS index (``faiss.read_index`` with ``IO_FLAG_MMAP_IFC`` for flat codes
and ``IO_FLAG_MMAP`` for IVF lists, read-only) and the CSR arrays (NumPy ``mmap_mode="r"``); the
pages are file-backed, shared between replicas on a node and reclaimable by the kernel. Seismic
(``pyseismic-lsr``) offers only ``SeismicIndex.load(path)``, which deserialises the whole index
into its own memory: no memory mapping there. Shards on object storage are first copied to a
local cache folder (checksummed), then mapped.
"""

from __future__ import annotations

import hashlib
import json
import io
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdray import storage
from sdray.index.config import IndexConfig
from sdray.index.csr import CSR, ExactSparseIndex, score_rows, to_csr
from sdray.index.dense import DenseIndex
from sdray.index.sparse import SeismicIndex, build_sparse

SIDES = ("images", "captions")
SHARD_JSON = "shard.json"
FORMAT = 1


class IndexFileError(RuntimeError):
    """A shard or manifest file is missing, corrupted or inconsistent; the message names the file."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ShardData:
    """What a shard is built from: ``n`` documents of one side.

    ``dense (n, D)`` float32 L2-normalised; ``sparse`` a :class:`CSR` (or anything
    :func:`~sdray.index.csr.to_csr` takes) of ``n`` rows; ``ids`` unique strings; ``doc_no`` a
    global row number used to break score ties identically however the corpus is sharded.
    ``uris`` locate a document's image for the image route (``<raw shard>#<key>``); ``urls`` are
    its source URLs (img2dataset's ``url``), ``None`` when unknown; ``image_locs`` where the image
    bytes sit in that raw shard (:mod:`sdray.data.locations`), ``None`` when unknown.
    """

    dense: np.ndarray
    sparse: Any
    ids: list[str]
    image_ids: list[str | None] | None = None
    captions: list[str | None] | None = None
    uris: list[str | None] | None = None
    doc_no: np.ndarray | None = None
    vocab_size: int | None = None
    urls: list[str | None] | None = None
    image_locs: list[str | None] | None = None

    def __post_init__(self) -> None:
        if hasattr(self.dense, "detach"):
            self.dense = self.dense.detach().cpu().numpy()
        self.dense = np.ascontiguousarray(self.dense, dtype=np.float32)
        self.sparse = to_csr(self.sparse, dim=self.vocab_size)
        n = len(self.ids)
        if self.dense.ndim != 2 or len(self.dense) != n or self.sparse.n_rows != n:
            raise ValueError(
                f"shard data disagree: {n} ids, dense {self.dense.shape}, sparse {self.sparse.n_rows} rows"
            )
        if len(set(self.ids)) != n:
            raise ValueError("document ids must be unique")
        self.ids = [str(i) for i in self.ids]
        for name in ("image_ids", "captions", "uris", "urls", "image_locs"):
            col = getattr(self, name)
            if col is None:
                setattr(self, name, [None] * n)
            elif len(col) != n:
                raise ValueError(f"{name} has {len(col)} entries for {n} documents")
        self.doc_no = np.arange(n, dtype=np.int64) if self.doc_no is None else np.asarray(self.doc_no, np.int64)


@dataclass
class Shard:
    """A searchable shard side: local ids are row numbers ``0..n-1``."""

    dense: DenseIndex
    sparse_index: Any  # SeismicIndex | ExactSparseIndex
    docs: CSR
    meta: dict[str, list]
    doc_no: np.ndarray
    config: IndexConfig = field(default_factory=IndexConfig)
    name: str = ""

    def __post_init__(self) -> None:
        self._doc_major = self.docs.to_scipy()

    def __len__(self) -> int:
        return len(self.doc_no)

    @property
    def exact_sparse(self) -> bool:
        return isinstance(self.sparse_index, ExactSparseIndex)

    @classmethod
    def build(cls, data: ShardData, config: IndexConfig | None = None, name: str = "") -> "Shard":
        config = config or IndexConfig()
        dense = DenseIndex.build(data.dense, config.dense)
        sparse = build_sparse(data.sparse, config.sparse, threads=config.threads)
        meta = {"id": data.ids, "image_id": data.image_ids, "caption": data.captions, "uri": data.uris,
                "url": data.urls, "image_loc": data.image_locs}
        return cls(dense, sparse, data.sparse, meta, data.doc_no, config, name)

    # ---- search (all scores returned by score_* are exact) -------------------------------
    def search_dense(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.dense.search(queries, k)

    def search_sparse(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the sparse index (Seismic scores are approximate: rescore them)."""
        q = to_csr(queries, dim=self.docs.dim)
        if self.exact_sparse:
            return self.sparse_index.search(q, k, tiebreak=self.doc_no)
        c = self.config.sparse
        return self.sparse_index.search(q, k, c.query_cut, c.heap_factor, threads=self.config.threads)

    def score_dense(self, query, ids) -> np.ndarray:
        return self.dense.score(query, ids)

    def score_sparse(self, query: CSR, ids) -> np.ndarray:
        return score_rows(self._doc_major, to_csr(query, dim=self.docs.dim), ids)

    def explain(self, query: CSR, local_id: int, vocabulary: list[str] | None = None, top: int = 10) -> list[dict]:
        """The terms shared by the query and document ``local_id``, heaviest contribution first."""
        q = to_csr(query, dim=self.docs.dim)
        qi, qv = q.row(0)
        di, dv = self.docs.row(int(local_id))
        common, qa, da = np.intersect1d(qi, di, assume_unique=True, return_indices=True)
        contrib = qv[qa] * dv[da]
        order = np.argsort(-contrib, kind="stable")[:top]
        return [
            {
                "term": vocabulary[int(common[j])] if vocabulary else str(int(common[j])),
                "term_id": int(common[j]),
                "query": float(qv[qa[j]]),
                "doc": float(dv[da[j]]),
            }
            for j in order
        ]

    def row_meta(self, local_id: int) -> dict:
        return {key: col[int(local_id)] for key, col in self.meta.items()}

    # ---- persistence ----------------------------------------------------------------------
    def to_files(self) -> dict[str, bytes]:
        files: dict[str, bytes] = {"dense.faiss": self.dense.to_bytes()}
        if isinstance(self.sparse_index, SeismicIndex):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "sparse.seismic")
                self.sparse_index.save(path)
                with open(path, "rb") as f:
                    files["sparse.seismic"] = f.read()
        for part in ("indptr", "indices", "values"):
            files[f"sparse.{part}.npy"] = _npy_bytes(getattr(self.docs, part))
        table = pa.table(
            {
                "id": pa.array(self.meta["id"], pa.string()),
                "image_id": pa.array(self.meta["image_id"], pa.string()),
                "caption": pa.array(self.meta["caption"], pa.string()),
                "uri": pa.array(self.meta["uri"], pa.string()),
                "url": pa.array(self.meta["url"], pa.string()),
                "image_loc": pa.array(self.meta["image_loc"], pa.string()),
                "doc_no": pa.array(self.doc_no, pa.int64()),
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        files["meta.parquet"] = buf.getvalue()
        return files

    def save(self, uri: str) -> dict:
        """Write every file under ``uri`` and ``shard.json`` last; returns the shard.json content."""
        files = self.to_files()
        info = {
            "format": FORMAT,
            "count": len(self),
            "dense_dim": self.dense.dim,
            "vocab_size": self.docs.dim,
            "nnz": self.docs.nnz,
            "dense_kind": self.dense.kind,  # what was built ("auto" resolved)
            "sparse_kind": "exact" if self.exact_sparse else "seismic",
            "files": {},
        }
        for name, data in files.items():
            storage.write_bytes(storage.join(uri, name), data)
            info["files"][name] = {"sha256": sha256(data), "bytes": len(data)}
        storage.write_json(storage.join(uri, SHARD_JSON), info)
        return info

    @classmethod
    def load(
        cls,
        uri: str,
        config: IndexConfig | None = None,
        expected: dict | None = None,
        verify: bool | None = None,
        name: str = "",
        mmap: bool = False,
        cache_dir: str | None = None,
    ) -> "Shard":
        """Load a shard side from ``uri``; ``expected`` is its manifest entry (files and checksums).

        ``mmap``: memory-map the dense index and CSR arrays (see module docstring); remote shards
        are copied under ``cache_dir`` (default: a temp folder) first. Raises
        :class:`IndexFileError` naming the file when one is missing, has the wrong size or
        checksum, or cannot be decoded.
        """
        config = config or IndexConfig()
        verify = config.verify_checksums if verify is None else verify
        if expected is None:
            info_uri = storage.join(uri, SHARD_JSON)
            expected = read_index_json(info_uri)
        files = expected.get("files", {})
        if mmap:
            return cls._load_mapped(uri, config, expected, verify, name, cache_dir)

        def read(fname: str) -> bytes:
            furi = storage.join(uri, fname)
            if fname not in files:
                raise IndexFileError(f"{furi}: not listed in the shard's manifest entry")
            try:
                data = storage.read_bytes(furi)
            except FileNotFoundError as err:
                raise IndexFileError(f"{furi}: missing shard file") from err
            want = files[fname]
            if len(data) != want["bytes"]:
                raise IndexFileError(f"{furi}: corrupted shard file ({len(data)} bytes, expected {want['bytes']})")
            if verify and sha256(data) != want["sha256"]:
                raise IndexFileError(f"{furi}: corrupted shard file (sha256 mismatch)")
            return data

        def decode(fname: str, fn):
            data = read(fname)
            try:
                return fn(data)
            except IndexFileError:
                raise
            except Exception as err:
                raise IndexFileError(f"{storage.join(uri, fname)}: cannot be decoded ({err})") from err

        dense = decode("dense.faiss", lambda b: DenseIndex.from_bytes(b, config.dense))
        parts = {p: decode(f"sparse.{p}.npy", _npy_load) for p in ("indptr", "indices", "values")}
        vocab = int(expected.get("vocab_size", 0))
        try:
            docs = CSR(parts["indptr"], parts["indices"], parts["values"], vocab)
        except ValueError as err:
            raise IndexFileError(f"{storage.join(uri, 'sparse.indptr.npy')}: inconsistent sparse arrays ({err})") from err
        table = decode("meta.parquet", lambda b: pq.read_table(io.BytesIO(b)))
        if "sparse.seismic" in files and config.sparse.kind == "seismic":
            sparse = decode("sparse.seismic", lambda b: _seismic_from_bytes(b, vocab, config))
        else:
            sparse = ExactSparseIndex(docs)
        return cls._assemble(uri, expected, dense, sparse, docs, table, config, name)


    @classmethod
    def _load_mapped(cls, uri: str, config: IndexConfig, expected: dict, verify: bool, name: str,
                     cache_dir: str | None) -> "Shard":
        files = expected.get("files", {})
        local = {f: _local_copy(storage.join(uri, f), files, f, verify, cache_dir) for f in files}

        def need(fname: str) -> str:
            if fname not in local:
                raise IndexFileError(f"{storage.join(uri, fname)}: not listed in the shard's manifest entry")
            return local[fname]

        def decode(fname: str, fn):
            path = need(fname)
            try:
                return fn(path)
            except Exception as err:
                raise IndexFileError(f"{storage.join(uri, fname)}: cannot be decoded ({err})") from err

        dense = decode("dense.faiss", lambda p: DenseIndex.read_mapped(p, config.dense))
        parts = {p: decode(f"sparse.{p}.npy", lambda f: np.load(f, mmap_mode="r", allow_pickle=False))
                 for p in ("indptr", "indices", "values")}
        vocab = int(expected.get("vocab_size", 0))
        try:
            docs = CSR(parts["indptr"], parts["indices"], parts["values"], vocab)
        except ValueError as err:
            raise IndexFileError(f"{storage.join(uri, 'sparse.indptr.npy')}: inconsistent sparse arrays ({err})") from err
        table = decode("meta.parquet", lambda p: pq.read_table(p, memory_map=True))
        if "sparse.seismic" in files and config.sparse.kind == "seismic":
            sparse = decode("sparse.seismic", lambda p: SeismicIndex.load(p, vocab, config.sparse))
        else:
            sparse = ExactSparseIndex(docs)
        return cls._assemble(uri, expected, dense, sparse, docs, table, config, name)

    @classmethod
    def _assemble(cls, uri, expected, dense, sparse, docs, table, config, name) -> "Shard":
        n = table.num_rows
        if len(dense) != n or docs.n_rows != n or n != expected.get("count", n):
            raise IndexFileError(
                f"{uri}: shard files disagree (meta {n} rows, dense {len(dense)}, sparse {docs.n_rows}, "
                f"manifest {expected.get('count')})"
            )
        meta = {c: table.column(c).to_pylist() for c in ("id", "image_id", "caption", "uri")}
        # ``url`` and ``image_loc`` arrived after format 1's first shards: older shards have none
        for c in ("url", "image_loc"):
            meta[c] = table.column(c).to_pylist() if c in table.column_names else [None] * n
        doc_no = table.column("doc_no").to_numpy().astype(np.int64)
        return cls(dense, sparse, docs, meta, doc_no, config, name)


def _local_copy(furi: str, files: dict, fname: str, verify: bool, cache_dir: str | None) -> str:
    """A local, verified path of shard file ``furi`` (itself when local; else a cached copy)."""
    want = files[fname]
    if storage.is_remote(furi):
        folder = os.path.join(cache_dir or os.path.join(tempfile.gettempdir(), "sdray-shards"),
                              want["sha256"][:2])
        path = os.path.join(folder, want["sha256"])
        if not os.path.exists(path):
            try:
                data = storage.read_bytes(furi)
            except FileNotFoundError as err:
                raise IndexFileError(f"{furi}: missing shard file") from err
            os.makedirs(folder, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.part"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
    else:
        path = furi[len("file://"):] if furi.startswith("file://") else furi
        if not os.path.exists(path):
            raise IndexFileError(f"{furi}: missing shard file")
    size = os.path.getsize(path)
    if size != want["bytes"]:
        raise IndexFileError(f"{furi}: corrupted shard file ({size} bytes, expected {want['bytes']})")
    if verify and _file_sha256(path) != want["sha256"]:
        raise IndexFileError(f"{furi}: corrupted shard file (sha256 mismatch)")
    return path


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_index_json(uri: str) -> Any:
    """JSON metadata of an index; :class:`IndexFileError` names a missing or corrupted file."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as err:
        raise IndexFileError(f"{uri}: missing") from err
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise IndexFileError(f"{uri}: corrupted JSON ({err})") from err


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _seismic_from_bytes(data: bytes, dim: int, config: IndexConfig) -> SeismicIndex:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sparse.index.seismic")
        with open(path, "wb") as f:
            f.write(data)
        return SeismicIndex.load(path, dim, config.sparse)
