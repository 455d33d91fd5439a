"""Retrieval evaluation math: recall@K, MRR@10 with several relevant items, sparsity and FLOPs.

Pure PyTorch/NumPy (no Ray, no SciPy import). Conventions (DESIGN.md §1 "Metrics", §4):

* A score matrix has queries as rows and items as columns. For image–text data the model
  produces ``scores_i2t`` of shape ``(n_images, n_texts)``; text→image evaluation uses its
  transpose.
* Relevance is a boolean pattern of the same shape: a dense ``numpy``/``torch`` bool (or 0/1)
  matrix, a ``torch`` sparse tensor (COO/CSR/CSC), or a SciPy sparse matrix/array (duck-typed via
  ``tocoo``). Stored zeros in sparse inputs are not relevant.
* **Tie rule (pessimistic, default)**: for a query whose best-scoring relevant item has score
  ``b``, the rank of the first relevant item is::

      rank = 1 + #{items with score > b} + #{non-relevant items with score == b}

  i.e. items are sorted by descending score and, within a tie, non-relevant items come first.
  ``ties="optimistic"`` drops the second term (relevant items first within a tie). Both are
  exact, deterministic and independent of item order; NaN scores are rejected.
* Queries without any relevant item are **excluded** from every mean (they neither count as hits
  nor as misses). If no query has a relevant item a ``ValueError`` is raised.

References: recall@K as "fraction of queries with at least one relevant item in the top K" is
the standard image–text retrieval protocol (Karpathy & Fei-Fei, CVPR 2015; used by Song et al.,
CIKM 2025). MRR: Voorhees, TREC-8 QA track (1999). FLOPs: Paria et al., "Minimizing FLOPs to
Learn Efficient Sparse Representations", ICLR 2020.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)
DEFAULT_CHUNK = 1024
TIE_RULES = ("pessimistic", "optimistic")


class _Pattern(NamedTuple):
    """Non-zero pattern of a sparse matrix in CSR form (sorted, duplicate-free, no stored zeros)."""

    indptr: np.ndarray  # (n_rows + 1,) int64
    indices: np.ndarray  # (nnz,) int64 column ids
    shape: tuple[int, int]


def _is_sparse(x: Any) -> bool:
    return (isinstance(x, torch.Tensor) and x.layout != torch.strided) or hasattr(x, "tocoo")


def _pattern(x: Any) -> _Pattern:
    """Non-zero pattern of a torch sparse tensor or a SciPy sparse matrix/array."""
    if isinstance(x, torch.Tensor):
        coo = x.to_sparse_coo().coalesce()
        rows, cols = coo.indices().numpy()
        keep = (coo.values() != 0).numpy()
    else:
        coo = x.tocoo(copy=True)
        coo.sum_duplicates()
        rows, cols, keep = coo.row, coo.col, coo.data != 0
    n_rows, n_cols = (int(d) for d in x.shape)
    rows, cols = rows[keep].astype(np.int64), cols[keep].astype(np.int64)
    order = np.lexsort((cols, rows))
    counts = np.bincount(rows, minlength=n_rows)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return _Pattern(indptr, cols[order], (n_rows, n_cols))


def _dense_rows(x: Any, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a dense numpy/torch matrix as a ``torch`` tensor (no copy if possible)."""
    if isinstance(x, torch.Tensor):
        return x[start:stop].detach()
    return torch.as_tensor(np.asarray(x[start:stop]))


def _entries(rel: Any, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows - start, cols)`` of the relevant entries in rows ``start:stop``."""
    if isinstance(rel, _Pattern):
        lo, hi = rel.indptr[start], rel.indptr[stop]
        rows = np.repeat(np.arange(stop - start), np.diff(rel.indptr[start : stop + 1]))
        return torch.from_numpy(rows), torch.from_numpy(rel.indices[lo:hi])
    return (_dense_rows(rel, start, stop) != 0).nonzero(as_tuple=True)


def relevance_from_pairs(
    pairs: Iterable[tuple[int, int]], n_images: int, n_texts: int, sparse: bool = False
) -> np.ndarray | torch.Tensor:
    """Image×text relevance from ``(image_idx, text_idx)`` pairs (DESIGN.md §3).

    A caption is relevant to an image when some sample pairs them; repeated pairs are fine.

    Returns:
        ``np.ndarray`` bool of shape ``(n_images, n_texts)``, or with ``sparse=True`` a coalesced
        ``torch`` sparse COO bool tensor of that shape. Transpose (``.T`` / ``.t()``) for t2i.
    """
    arr = np.asarray(list(pairs), dtype=np.int64).reshape(-1, 2)
    if arr.size and (arr.min() < 0 or arr[:, 0].max() >= n_images or arr[:, 1].max() >= n_texts):
        raise ValueError(f"pair index out of range for {n_images} images × {n_texts} texts")
    if sparse:
        idx = torch.from_numpy(np.unique(arr, axis=0).T.copy())
        return torch.sparse_coo_tensor(
            idx, torch.ones(idx.shape[1], dtype=torch.bool), (n_images, n_texts),
            is_coalesced=True, check_invariants=True,
        )
    rel = np.zeros((n_images, n_texts), dtype=bool)
    rel[arr[:, 0], arr[:, 1]] = True
    return rel


def _chunk_ranks(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, ties: str) -> torch.Tensor:
    """Rank of the first relevant item per row of ``scores (c, n)`` (0 when none) → ``(c,)``.

    ``rows, cols`` index the relevant entries. Uses the identity
    ``#{s > b} + #{non-relevant, s == b} = #{s >= b} - #{relevant, s == b}``.
    """
    if not scores.is_floating_point():
        scores = scores.double()
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    c, device = scores.shape[0], scores.device
    rows, cols = rows.to(device), cols.to(device)
    values = scores[rows, cols]
    best = torch.full((c,), -torch.inf, dtype=scores.dtype, device=device).scatter_reduce(0, rows, values, "amax")
    if ties == "pessimistic":
        tied_relevant = torch.bincount(rows, weights=(values == best[rows]).double(), minlength=c)
        rank = 1 + (scores >= best[:, None]).sum(dim=1) - tied_relevant.long()
    else:
        rank = 1 + (scores > best[:, None]).sum(dim=1)
    return torch.where(torch.bincount(rows, minlength=c) > 0, rank, 0)


def first_relevant_ranks(
    scores: Any, relevant: Any, ties: str = "pessimistic", chunk_size: int = DEFAULT_CHUNK
) -> np.ndarray:
    """1-based rank of the first relevant item for every query row (see module tie rule).

    Args:
        scores: ``(n_queries, n_items)`` torch tensor (any device) or numpy array (higher = better).
        relevant: ``(n_queries, n_items)`` relevance pattern (dense bool, torch sparse, SciPy sparse).
        ties: ``"pessimistic"`` (default) or ``"optimistic"``.
        chunk_size: query rows processed at once; memory is O(chunk_size · n_items).

    Returns:
        ``np.ndarray`` int64 ``(n_queries,)``; 0 for queries with no relevant item.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    if tuple(scores.shape) != tuple(relevant.shape) or len(scores.shape) != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} must be equal 2-D shapes")
    rel = _pattern(relevant) if _is_sparse(relevant) else relevant
    n = scores.shape[0]
    bounds = [(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]
    parts = [_chunk_ranks(_dense_rows(scores, a, b), *_entries(rel, a, b), ties) for a, b in bounds]
    return torch.cat(parts).cpu().numpy() if parts else np.zeros(0, dtype=np.int64)


def metrics_from_ranks(ranks: np.ndarray, ks: Iterable[int] = DEFAULT_KS, mrr_k: int = 10) -> dict[str, float]:
    """``{"R@k": …, "MRR@mrr_k": …}`` from first-relevant ranks (0 = no relevant item, excluded).

    R@k is the fraction of queries whose first relevant item has rank ≤ k; MRR@k averages
    ``1/rank`` when rank ≤ k, else 0.
    """
    ranks = np.asarray(ranks)
    ranks = ranks[ranks > 0]
    if ranks.size == 0:
        raise ValueError("no query has a relevant item")
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out[f"MRR@{mrr_k}"] = float(np.mean(np.where(ranks <= mrr_k, 1.0 / ranks, 0.0)))
    return out


def ranking_metrics(scores: Any, relevant: Any, ks: Iterable[int] = DEFAULT_KS, mrr_k: int = 10, **kw: Any) -> dict[str, float]:
    """R@K and MRR@10 for queries as rows of ``scores (n_queries, n_items)``.

    ``kw`` goes to :func:`first_relevant_ranks` (``ties``, ``chunk_size``).
    """
    return metrics_from_ranks(first_relevant_ranks(scores, relevant, **kw), ks, mrr_k)


def _transpose(x: Any) -> Any:
    return x.t() if isinstance(x, torch.Tensor) else x.T


def retrieval_metrics(scores_i2t: Any, relevant: Any, **kw: Any) -> dict[str, dict[str, float]]:
    """Both directions of image–text retrieval (DESIGN.md §4 eval JSON, per representation).

    Args:
        scores_i2t: ``(n_images, n_texts)`` scores, images as rows.
        relevant: ``(n_images, n_texts)`` relevance (e.g. from :func:`relevance_from_pairs`).
        **kw: forwarded to :func:`ranking_metrics` (``ks``, ``mrr_k``, ``ties``, ``chunk_size``).

    Returns:
        ``{"t2i": {"R@1", "R@5", "R@10", "MRR@10"}, "i2t": {…}}`` as python floats in [0, 1].
    """
    return {
        "t2i": ranking_metrics(_transpose(scores_i2t), _transpose(relevant), **kw),
        "i2t": ranking_metrics(scores_i2t, relevant, **kw),
    }


def _nonzero_stats(x: Any, chunk_size: int = DEFAULT_CHUNK) -> tuple[int, np.ndarray]:
    """``(n_rows, per-column non-zero counts (V,))`` of a dense or sparse ``(n, V)`` matrix."""
    if len(x.shape) != 2:
        raise ValueError(f"expected a 2-D (n, V) matrix, got shape {tuple(x.shape)}")
    n, v = (int(d) for d in x.shape)
    if _is_sparse(x):
        return n, np.bincount(_pattern(x).indices, minlength=v)
    counts = sum(
        ((_dense_rows(x, a, min(a + chunk_size, n)) != 0).sum(dim=0) for a in range(0, n, chunk_size)),
        torch.zeros(v, dtype=torch.int64),
    )
    return n, counts.numpy()


def mean_nnz(sparse: Any) -> float:
    """Mean number of non-zero entries per row of ``sparse (n, V)`` (dense or sparse input)."""
    n, counts = _nonzero_stats(sparse)
    return float(counts.sum() / n) if n else 0.0


def flops(q_sparse: Any, d_sparse: Any) -> float:
    """Expected multiply-adds per query–document pair: ``Σ_v P(q_v≠0)·P(d_v≠0)``.

    Paria et al., ICLR 2020, eq. (FLOPs); DESIGN.md §1. Equals the mean, over all
    ``n_q × n_d`` pairs, of the number of shared non-zero dimensions.

    Args:
        q_sparse: ``(n_q, V)`` query vectors (dense or sparse).
        d_sparse: ``(n_d, V)`` document vectors (dense or sparse), same ``V``.
    """
    (n_q, cq), (n_d, cd) = _nonzero_stats(q_sparse), _nonzero_stats(d_sparse)
    if cq.shape != cd.shape:
        raise ValueError(f"vocabulary sizes differ: {cq.shape[0]} vs {cd.shape[0]}")
    if n_q == 0 or n_d == 0:
        return 0.0
    return float(np.dot(cq / n_q, cd / n_d))
