"""Dense shard index: FAISS inner product over L2-normalised vectors (cosine).

``flat`` (exact), ``ivf`` (IndexIVFFlat, ``nlist``/``nprobe``), ``hnsw`` (IndexHNSWFlat,
``M``/``ef_construction``/``ef_search``) or ``auto`` (the default: flat below
``DenseIndexConfig.ivf_min_docs`` documents per shard, IVF from there; the threshold was measured
with ``benchmarks/dense_kind.py``, see docs/guide.md). All keep the full float32 vectors, so
:meth:`DenseIndex.vectors` reconstructs any document exactly for hybrid rescoring and no second
copy is stored. Saved with ``faiss.serialize_index`` (no pickle).

GPU: with a faiss build that has GPU support (the ``faiss-gpu-cu12`` wheel, ``pip install
sdray[gpu]``) and a visible GPU, IVF k-means training and adding run on the GPU
(``DenseIndexConfig.gpu``), and :func:`to_gpu` gives an index whose searches run there; without
either, everything stays on the CPU unchanged. Saved indexes are always CPU indexes.
"""

from __future__ import annotations

import numpy as np

import faiss

from sdray.index.config import DenseIndexConfig
from sdray.index.csr import PAD_ID, PAD_SCORE


def _as_f32(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    return x


def gpu_available() -> bool:
    """True when this faiss build has GPU support and at least one GPU is visible."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_GPU_RESOURCES: list = []


def _gpu_resources():
    """One ``StandardGpuResources`` per process (scratch memory and streams; costly to create)."""
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return _GPU_RESOURCES[0]


def _gpu_clonable(index: faiss.Index) -> bool:
    """faiss clones flat and IVF indexes to GPU; HNSW has no GPU counterpart."""
    return not isinstance(index, faiss.IndexHNSW)


def to_gpu(index, device: int = 0):
    """``index`` (a :class:`DenseIndex` or a ``faiss.Index``) with its searches on GPU ``device``.

    Returns the index unchanged when faiss has no GPU support, no GPU is visible, or the index
    kind has no GPU version (HNSW). A :class:`DenseIndex` keeps its CPU index for
    :meth:`DenseIndex.vectors` and serialisation and searches the GPU copy.
    """
    if isinstance(index, DenseIndex):
        if not gpu_available() or not _gpu_clonable(index.index) or len(index) == 0:
            return index
        return DenseIndex(index.index, index.config, search_index=to_gpu(index.index, device))
    if not gpu_available() or not _gpu_clonable(index):
        return index
    return faiss.index_cpu_to_gpu(_gpu_resources(), device, index)


def resolve_kind(config: DenseIndexConfig, n: int) -> str:
    """The index kind for ``n`` documents: ``config.kind``, with ``auto`` -> flat or ivf."""
    if config.kind != "auto":
        return config.kind
    return "ivf" if n >= config.ivf_min_docs else "flat"


def _train_and_add(index: faiss.Index, x: np.ndarray, use_gpu: bool) -> faiss.Index:
    """Train (if needed) and fill ``index`` with ``x``; on a GPU when ``use_gpu`` and one is
    there (IVF k-means is where the GPU pays), returning a CPU index either way."""
    if use_gpu and gpu_available() and _gpu_clonable(index) and not index.is_trained:
        gpu = to_gpu(index)
        gpu.train(x)
        gpu.add(x)
        return faiss.index_gpu_to_cpu(gpu)
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return index


class DenseIndex:
    """A FAISS index over one shard's dense vectors; ids are row numbers ``0..n-1``.

    ``search_index``: where searches run (a GPU copy from :func:`to_gpu`); default ``index``.
    """

    def __init__(self, index: faiss.Index, config: DenseIndexConfig | None = None,
                 search_index: faiss.Index | None = None):
        self.index = index
        self.config = config or DenseIndexConfig()
        self._search_index = index if search_index is None else search_index
        self._apply_search_params()

    @property
    def kind(self) -> str:
        """``flat``, ``ivf`` or ``hnsw``: what was built (``auto`` resolved)."""
        if isinstance(self.index, faiss.IndexHNSW):
            return "hnsw"
        return "flat" if isinstance(self.index, faiss.IndexFlat) else "ivf"

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on a GPU copy of the index."""
        return self._search_index is not self.index

    def _apply_search_params(self) -> None:
        ivf = faiss.try_extract_index_ivf(self.index) if not isinstance(self.index, faiss.IndexFlat) else None
        if ivf is not None:
            ivf.nprobe = min(self.config.nprobe, ivf.nlist)
            if ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.make_direct_map()
            if self.on_gpu and hasattr(self._search_index, "nprobe"):
                self._search_index.nprobe = ivf.nprobe
        if isinstance(self.index, faiss.IndexHNSW):
            self.index.hnsw.efSearch = self.config.ef_search

    @classmethod
    def build(cls, vectors, config: DenseIndexConfig | None = None) -> "DenseIndex":
        """Build over ``vectors (n, D)`` float32 (expected L2-normalised); IVF is trained on a
        GPU when ``config.gpu`` and one is available (see the module notes)."""
        config = config or DenseIndexConfig()
        x = _as_f32(vectors)
        n, d = x.shape
        kind = resolve_kind(config, n)
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, config.M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.ef_construction
        else:
            nlist = max(1, min(config.nlist, n // 39))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        if n:
            index = _train_and_add(index, x, config.gpu)
        return cls(index, config)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (B,k) float32, ids (B,k) int64)``; missing results are ``-inf`` / ``-1``."""
        q = _as_f32(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"dense queries have dimension {q.shape[1]}, index has {self.dim}")
        if len(self) == 0 or k <= 0:
            return np.full((len(q), k), PAD_SCORE, np.float32), np.full((len(q), k), PAD_ID, np.int64)
        s, i = self._search_index.search(q, k)
        s = s.astype(np.float32)
        s[i < 0] = PAD_SCORE
        return s, i.astype(np.int64)

    def vectors(self, ids) -> np.ndarray:
        """Stored vectors of documents ``ids`` ``(len(ids), D)`` (exact for flat, ivf and hnsw)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        if isinstance(self.index, faiss.IndexFlat):
            return faiss.rev_swig_ptr(self.index.get_xb(), len(self) * self.dim).reshape(len(self), self.dim)[ids]
        return self.index.reconstruct_batch(ids)

    def score(self, query, ids) -> np.ndarray:
        """Exact cosine (dot product) of one query with documents ``ids``."""
        q = _as_f32(query).reshape(-1)
        return (self.vectors(ids) @ q).astype(np.float32)

    def to_bytes(self) -> bytes:
        ivf = None if isinstance(self.index, faiss.IndexFlat) else faiss.try_extract_index_ivf(self.index)
        if ivf is not None:  # direct map is rebuilt on load; keep the file small
            ivf.set_direct_map_type(faiss.DirectMap.NoMap)
        data = faiss.serialize_index(self.index).tobytes()
        self._apply_search_params()
        return data

    @classmethod
    def from_bytes(cls, data: bytes, config: DenseIndexConfig | None = None) -> "DenseIndex":
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return cls(index, config)

    @classmethod
    def read_mapped(cls, path: str, config: DenseIndexConfig | None = None) -> "DenseIndex":
        """Memory-map a file written from :meth:`to_bytes` (flat codes and IVF lists, read-only)."""
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
        return cls(faiss.read_index(path, flags), config)

