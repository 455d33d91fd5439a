"""Sparse shard index: Seismic (pyseismic-lsr) over CSR documents, with the exact scorer as fallback.

Seismic (Bruch et al., SIGIR 2024) prunes each posting list, clusters it into blocks with summary
vectors and skips blocks whose summary bound cannot enter the top-k; it is approximate, and its
scores are quantised. Callers that need exact scores rescore candidates from the stored CSR
(:func:`sdray.index.csr.score_rows`); the :class:`~sdray.index.retriever.Retriever` always does.

Documents are added with ids ``"0".."n-1"`` (row numbers); documents without terms are skipped by
Seismic and can never be returned (their score is 0 for every query).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from sdray.index.config import SparseIndexConfig
from sdray.index.csr import CSR, PAD_ID, PAD_SCORE, ExactSparseIndex, to_csr

SEISMIC_SUFFIX = ".index.seismic"


def _seismic():
    try:
        import seismic
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise ImportError("pyseismic-lsr is required for sparse.kind='seismic' (pip install pyseismic-lsr)") from err
    return seismic


def default_n_postings(docs: CSR) -> int:
    """Mean posting-list length over the terms in use (at least 500): prunes only long lists."""
    active = max(1, int(np.count_nonzero(np.bincount(docs.indices, minlength=docs.dim))))
    return int(max(500, docs.nnz / active))


class SeismicIndex:
    """A Seismic index over one shard's sparse vectors; ids are row numbers ``0..n-1``."""

    def __init__(self, index, dim: int, config: SparseIndexConfig | None = None):
        self.index = index
        self.dim = int(dim)
        self.config = config or SparseIndexConfig()
        self._str = _seismic().get_seismic_string()
        self._terms = np.array([str(i) for i in range(self.dim)], dtype=self._str)

    @classmethod
    def build(cls, docs: CSR, config: SparseIndexConfig | None = None, threads: int = 0) -> "SeismicIndex":
        config = config or SparseIndexConfig()
        seismic = _seismic()
        ds = seismic.SeismicDataset(dim=docs.dim)
        ds.add_documents_by_id(
            [str(i) for i in range(docs.n_rows)],
            docs.indices.astype(np.int64),
            docs.values,
            docs.indptr,
        )
        n_postings = config.n_postings or default_n_postings(docs)
        index = seismic.SeismicIndex.build_from_dataset(
            ds,
            n_postings=n_postings,
            centroid_fraction=config.centroid_fraction,
            min_cluster_size=config.min_cluster_size,
            summary_energy=config.summary_energy,
            max_fraction=config.max_fraction,
            doc_cut=config.doc_cut,
            num_threads=threads,
        )
        return cls(index, docs.dim, config)

    def __len__(self) -> int:
        return int(self.index.len)

    def search(
        self, queries, k: int, query_cut: int | None = None, heap_factor: float | None = None, threads: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (B,k) float32 approximate, ids (B,k) int64)`` padded with ``-inf`` / ``-1``."""
        q = to_csr(queries, dim=self.dim)
        b = q.n_rows
        out_s = np.full((b, k), PAD_SCORE, dtype=np.float32)
        out_i = np.full((b, k), PAD_ID, dtype=np.int64)
        rows = [r for r in range(b) if q.indptr[r + 1] > q.indptr[r]]
        if not rows or k <= 0:
            return out_s, out_i
        comps = [self._terms[q.row(r)[0]] for r in rows]
        vals = [q.row(r)[1] for r in rows]
        qids = np.array([str(r) for r in rows], dtype=self._str)
        res = self.index.batch_search(
            qids,
            comps,
            vals,
            k=k,
            query_cut=query_cut or self.config.query_cut,
            heap_factor=heap_factor or self.config.heap_factor,
            num_threads=threads,
        )
        for hits in res:  # results are not in query order: each hit carries its query id
            n = len(hits)
            if n:
                r = int(hits[0][0])
                out_s[r, :n] = [h[1] for h in hits]
                out_i[r, :n] = [int(h[2]) for h in hits]
        return out_s, out_i

    def save(self, path: str) -> None:
        """Write to local file ``path`` (exact name; Seismic's own suffix is handled here)."""
        with tempfile.TemporaryDirectory() as tmp:
            stem = os.path.join(tmp, "index")
            self.index.save(stem)
            shutil.move(stem + SEISMIC_SUFFIX, path)

    @classmethod
    def load(cls, path: str, dim: int, config: SparseIndexConfig | None = None) -> "SeismicIndex":
        """Load from local file ``path``; a file without Seismic's suffix is linked under one."""
        seismic = _seismic()
        if path.endswith(SEISMIC_SUFFIX):
            return cls(seismic.SeismicIndex.load(path), dim, config)
        with tempfile.TemporaryDirectory() as tmp:
            link = os.path.join(tmp, "index" + SEISMIC_SUFFIX)
            try:
                os.symlink(os.path.abspath(path), link)
            except OSError:
                shutil.copyfile(path, link)
            return cls(seismic.SeismicIndex.load(link), dim, config)


def build_sparse(docs: CSR, config: SparseIndexConfig | None = None, threads: int = 0):
    """Seismic when configured and the shard is large enough, else the exact scorer."""
    config = config or SparseIndexConfig()
    if config.kind == "seismic" and docs.n_rows >= max(1, config.min_docs) and docs.nnz > 0:
        return SeismicIndex.build(docs, config, threads)
    return ExactSparseIndex(docs)
