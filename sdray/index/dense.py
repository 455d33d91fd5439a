"""Dense shard index: FAISS inner product over L2-normalised vectors (cosine).

``flat`` (exact, the default), ``ivf`` (IndexIVFFlat, ``nlist``/``nprobe``) or ``hnsw``
(IndexHNSWFlat, ``M``/``ef_construction``/``ef_search``). All three keep the full float32 vectors,
so :meth:`DenseIndex.vectors` reconstructs any document exactly for hybrid rescoring and no
second copy is stored. Saved with ``faiss.serialize_index`` (no pickle).
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


class DenseIndex:
    """A FAISS index over one shard's dense vectors; ids are row numbers ``0..n-1``."""

    def __init__(self, index: faiss.Index, config: DenseIndexConfig | None = None):
        self.index = index
        self.config = config or DenseIndexConfig()
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        ivf = faiss.try_extract_index_ivf(self.index) if not isinstance(self.index, faiss.IndexFlat) else None
        if ivf is not None:
            ivf.nprobe = min(self.config.nprobe, ivf.nlist)
            if ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.make_direct_map()
        if isinstance(self.index, faiss.IndexHNSW):
            self.index.hnsw.efSearch = self.config.ef_search

    @classmethod
    def build(cls, vectors, config: DenseIndexConfig | None = None) -> "DenseIndex":
        """Build over ``vectors (n, D)`` float32 (expected L2-normalised)."""
        config = config or DenseIndexConfig()
        x = _as_f32(vectors)
        n, d = x.shape
        if config.kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif config.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, config.M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.ef_construction
        else:
            nlist = max(1, min(config.nlist, n // 39))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            if n:
                index.train(x)
        if n:
            index.add(x)
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
        s, i = self.index.search(q, k)
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


def to_gpu(index: faiss.Index, device: int = 0) -> faiss.Index:
    """``index`` copied to GPU ``device`` when faiss has GPU support and a GPU is visible, else itself."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device, index)
