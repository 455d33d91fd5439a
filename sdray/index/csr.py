"""Sparse vectors as CSR arrays, and the exact sparse scorer (ground truth and fallback).

A :class:`CSR` is three NumPy arrays — ``indptr`` int64 ``(n+1,)``, ``indices`` int32 ``(nnz,)``
(term ids, strictly increasing within a row), ``values`` float32 ``(nnz,)`` — plus the vocabulary
size ``dim``. It is what Seismic, scipy and the stored shard files use.

:class:`ExactSparseIndex` scores every document that shares a term with the query (dot product,
float32) through a term-major (inverted) copy of the documents; documents with score 0 are never
returned, so a result list may be shorter than ``k`` (padded with id ``-1`` and score ``-inf``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

PAD_ID = -1
PAD_SCORE = -np.inf


@dataclass
class CSR:
    """Rows of sparse vectors in CSR layout (see module docstring)."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    dim: int

    def __post_init__(self) -> None:
        self.indptr = np.ascontiguousarray(self.indptr, dtype=np.int64)
        self.indices = np.ascontiguousarray(self.indices, dtype=np.int32)
        self.values = np.ascontiguousarray(self.values, dtype=np.float32)
        self.dim = int(self.dim)
        if self.indptr.ndim != 1 or len(self.indptr) < 1 or self.indptr[0] != 0:
            raise ValueError("CSR indptr must be 1-D and start at 0")
        if self.indptr[-1] != len(self.indices) or len(self.indices) != len(self.values):
            raise ValueError(
                f"CSR indptr ends at {int(self.indptr[-1])} but there are {len(self.indices)} indices "
                f"and {len(self.values)} values"
            )
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= self.dim):
            raise ValueError(f"CSR term ids must lie in [0, {self.dim})")

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def __len__(self) -> int:
        return self.n_rows

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(term ids, values)`` of row ``i``."""
        a, b = self.indptr[i], self.indptr[i + 1]
        return self.indices[a:b], self.values[a:b]

    def take(self, rows: Any) -> "CSR":
        """The given rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        m = self.to_scipy()[rows]
        return CSR(m.indptr, m.indices, m.data, self.dim)

    def to_scipy(self) -> sp.csr_matrix:
        return sp.csr_matrix((self.values, self.indices, self.indptr), shape=(self.n_rows, self.dim))

    def to_dense(self) -> np.ndarray:
        return self.to_scipy().toarray()

    @classmethod
    def from_scipy(cls, m: Any) -> "CSR":
        m = sp.csr_matrix(m, dtype=np.float32)
        m.sum_duplicates()
        m.sort_indices()
        return cls(m.indptr, m.indices, m.data, m.shape[1])

    @classmethod
    def empty(cls, dim: int) -> "CSR":
        return cls(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), dim)


def to_csr(x: Any, dim: int | None = None, topk: int | None = None) -> CSR:
    """A :class:`CSR` from a dense ``(B, V)`` torch/NumPy array, a scipy matrix or a CSR.

    Zeros are dropped; ``topk`` keeps the ``topk`` largest values per row (ties: lower term id).
    A 1-D input is one row.
    """
    if isinstance(x, CSR):
        out = x
    elif sp.issparse(x):
        out = CSR.from_scipy(x)
    else:
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"expected a (B, V) matrix, got shape {arr.shape}")
        rows, cols = np.nonzero(arr)
        indptr = np.zeros(arr.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=arr.shape[0]), out=indptr[1:])
        out = CSR(indptr, cols, arr[rows, cols], arr.shape[1])
    if dim is not None and out.dim != dim:
        if out.dim > dim:
            raise ValueError(f"sparse vectors have dimension {out.dim}, index vocabulary is {dim}")
        out = CSR(out.indptr, out.indices, out.values, dim)
    if topk is not None:
        out = prune_topk(out, topk)
    return out


def prune_topk(x: CSR, k: int) -> CSR:
    """Keep the ``k`` largest values of every row (term ids stay increasing)."""
    counts = np.diff(x.indptr)
    if k <= 0 or counts.max(initial=0) <= k:
        return x
    keep = np.ones(x.nnz, dtype=bool)
    for i in np.flatnonzero(counts > k):
        a, b = x.indptr[i], x.indptr[i + 1]
        v = x.values[a:b]
        order = np.lexsort((np.arange(b - a), -v))
        keep[a + order[k:]] = False
    rows = np.repeat(np.arange(x.n_rows), counts)[keep]
    indptr = np.zeros(x.n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=x.n_rows), out=indptr[1:])
    return CSR(indptr, x.indices[keep], x.values[keep], x.dim)


def concat(parts: list[CSR]) -> CSR:
    """Stack CSR blocks row-wise (all with the same ``dim``)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    dims = {p.dim for p in parts}
    if len(dims) != 1:
        raise ValueError(f"sparse blocks disagree on dimension: {sorted(dims)}")
    offsets = np.cumsum([0] + [p.nnz for p in parts])
    indptr = np.concatenate([parts[0].indptr[:1]] + [p.indptr[1:] + o for p, o in zip(parts, offsets)])
    return CSR(indptr, np.concatenate([p.indices for p in parts]), np.concatenate([p.values for p in parts]), dims.pop())


def topk_rows(scores: np.ndarray, k: int, tiebreak: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` columns per row of a dense score matrix: ``(scores (B,k), ids (B,k))``.

    Sorted by descending score, ties by ascending ``tiebreak[id]`` (default: the id). Entries that
    are ``-inf`` are returned as padding (id ``-1``).
    """
    scores = np.asarray(scores)
    b, n = scores.shape
    k_eff = min(k, n)
    out_s = np.full((b, k), PAD_SCORE, dtype=np.float32)
    out_i = np.full((b, k), PAD_ID, dtype=np.int64)
    if k_eff == 0:
        return out_s, out_i
    part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff] if k_eff < n else np.tile(np.arange(n), (b, 1))
    for r in range(b):
        ids = part[r]
        s = scores[r, ids]
        tb = ids if tiebreak is None else tiebreak[ids]
        order = np.lexsort((tb, -s))
        ids, s = ids[order], s[order]
        ok = np.isfinite(s)
        out_s[r, : ok.sum()] = s[ok]
        out_i[r, : ok.sum()] = ids[ok]
    return out_s, out_i


def topk_from_lists(
    ids: np.ndarray, scores: np.ndarray, k: int, tiebreak: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of one candidate list: ``(scores (k,), ids (k,))`` padded with -inf / -1."""
    out_s = np.full(k, PAD_SCORE, dtype=np.float32)
    out_i = np.full(k, PAD_ID, dtype=np.int64)
    if len(ids):
        tb = ids if tiebreak is None else tiebreak
        order = np.lexsort((tb, -scores))[:k]
        out_s[: len(order)] = scores[order]
        out_i[: len(order)] = ids[order]
    return out_s, out_i


class ExactSparseIndex:
    """Exact dot-product search over sparse documents (term-at-a-time through scipy).

    ``search`` returns only documents with a positive score. ``score`` computes the exact score
    of given documents; both use float32 arithmetic.
    """

    def __init__(self, docs: CSR):
        self.docs = docs
        self._doc_major = docs.to_scipy()
        self._term_major: sp.csr_matrix | None = None

    @property
    def term_major(self) -> sp.csr_matrix:
        """``(V, n)`` inverted index, built on first use."""
        if self._term_major is None:
            self._term_major = self._doc_major.T.tocsr()
        return self._term_major

    def __len__(self) -> int:
        return self.docs.n_rows

    def scores_all(self, queries: CSR) -> sp.csr_matrix:
        """``(B, n)`` sparse matrix of every positive query–document score."""
        q = to_csr(queries, dim=self.docs.dim).to_scipy()
        return (q @ self.term_major).tocsr()

    def search(
        self, queries: Any, k: int, tiebreak: np.ndarray | None = None, chunk: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` documents per query: ``(scores (B,k) float32, ids (B,k) int64)``."""
        queries = to_csr(queries, dim=self.docs.dim)
        b = queries.n_rows
        out_s = np.full((b, k), PAD_SCORE, dtype=np.float32)
        out_i = np.full((b, k), PAD_ID, dtype=np.int64)
        for start in range(0, b, chunk):
            block = CSR(
                queries.indptr[start : start + chunk + 1] - queries.indptr[start],
                queries.indices[queries.indptr[start] : queries.indptr[min(b, start + chunk)]],
                queries.values[queries.indptr[start] : queries.indptr[min(b, start + chunk)]],
                queries.dim,
            )
            m = self.scores_all(block)
            for r in range(m.shape[0]):
                a, e = m.indptr[r], m.indptr[r + 1]
                ids, s = m.indices[a:e].astype(np.int64), m.data[a:e]
                pos = s > 0
                ids, s = ids[pos], s[pos]
                if len(ids) > k:
                    sel = np.argpartition(-s, k - 1)[:k]
                    # keep every id tied with the k-th score so the tie-break is exact
                    kth = s[sel].min()
                    sel = np.flatnonzero(s >= kth)
                    ids, s = ids[sel], s[sel]
                out_s[start + r], out_i[start + r] = topk_from_lists(
                    ids, s, k, None if tiebreak is None else tiebreak[ids]
                )
        return out_s, out_i

    def score(self, query: Any, ids: np.ndarray) -> np.ndarray:
        """Exact scores ``(len(ids),)`` of one query against documents ``ids``."""
        q = to_csr(query, dim=self.docs.dim)
        if q.n_rows != 1:
            raise ValueError("score() takes one query")
        return score_rows(self._doc_major, q, ids)


def score_rows(doc_major: sp.csr_matrix, query: CSR, ids: np.ndarray) -> np.ndarray:
    """Exact float32 dot products of one query (CSR, 1 row) with rows ``ids`` of ``doc_major``."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros(0, dtype=np.float32)
    dense_q = np.zeros(query.dim, dtype=np.float32)
    dense_q[query.indices] = query.values
    sub = doc_major[ids]
    return np.asarray(sub @ dense_q, dtype=np.float32).reshape(-1)
