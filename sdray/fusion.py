"""Hybrid scoring at search time: fuse dense (cosine) and sparse (dot-product) scores.

Pure PyTorch/NumPy (no Ray). DESIGN.md §1 "Scoring at search time". Inputs are score matrices
``(n_queries, n_items)`` already computed by the caller: ``dense`` = cosine similarity
(embeddings are L2-normalised, so a dot product), ``sparse`` = dot product of sparse vectors.

Methods (strings used by configs):

* ``"raw"`` — ``w1·cos + w2·sparse``, the paper's evaluation (Song et al., CIKM 2025; no τ).
  Sparse scores in the tens to thousands swamp a cosine ≤ 1, so this ranks like sparse alone
  (DESIGN.md §1 reference-run notes); kept for comparison with the paper.
* ``"calibrated"`` — ``w1·cos/τ + w2·sparse``, the training-scale integrated score ``s_int``.
  With ``normalize="zscore"`` it is ``w1·z(cos) + w2·z(sparse)`` where ``z`` standardises each
  query row (population std; a constant row maps to 0); τ then cancels.
* ``"rrf"`` — reciprocal-rank fusion ``1/(k_rrf + rank_dense) + 1/(k_rrf + rank_sparse)``
  (Cormack, Clarke & Büttcher, SIGIR 2009; ``k_rrf`` = 60). Ranks are taken per query row over
  all items given, descending score, with **competition ranking on ties**: rank = 1 + number of
  items in the row with a strictly greater score (tied items share the best rank). Weights are
  not used by RRF.

**Query-dependent weight** (``"calibrated"`` only, ``confidence_power = p > 0``): each query row
gets its own sparse weight ``w2·(gap_sparse / gap_dense)^p``, where a side's *gap* is its top-1
score minus its top-2 score over the row's items, in the scale that is fused (``sparse`` and
``cos/τ`` — both the logits the model was trained with, so a gap is the side's log-odds of its
first item over its second — or the z-scores with ``normalize="zscore"``). The side that is
surer of its first item gets more say for that query; no relevance label is needed. The ratio
is clipped to ``[1/CONFIDENCE_CLIP, CONFIDENCE_CLIP]``; ``p = 0`` is the fixed-weight fusion. A
gap needs only each side's two best items, so over an index (the union of each side's top-k'
candidates) it is the corpus's gap for any depth ≥ 2 (z-scores aside).

**Dense-level weight** (``"calibrated"`` only, ``cosine_slope = β > 0``): the query's sparse
weight is also multiplied by ``exp(β·(cosine_pivot − max cos))``, ``max cos`` being the query's
best cosine (the raw ``dense`` input) over the row's items: a query that the dense side matches
poorly everywhere leans on the sparse side. ``cosine_pivot`` only sets which best-cosine keeps the
weight at ``w2``. The best cosine is the corpus's for any candidate depth ≥ 1.

The matrix function :func:`fuse` is the core; :func:`fuse_candidates` applies it to per-query
candidate lists for index search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

METHODS = ("raw", "calibrated", "rrf")
NORMALIZATIONS = (None, "zscore")
CONFIDENCE_CLIP = 1e4


def competition_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based descending ranks per row, ties sharing the best rank ("1224" ranking).

    ``scores (n_q, n)`` → int64 ``(n_q, n)`` with ``rank = 1 + #{j : scores[i, j] > scores[i, x]}``.
    """
    ascending = scores.sort(dim=-1).values.contiguous()
    not_greater = torch.searchsorted(ascending, scores.contiguous(), right=True)
    return scores.shape[-1] - not_greater + 1


def top_gap(scores: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 score per row: ``scores (n_q, n)`` → ``(n_q,)``; 0 when ``n < 2``."""
    if scores.shape[-1] < 2:
        return torch.zeros(scores.shape[:-1], dtype=scores.dtype)
    top = scores.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def query_weights(dense: torch.Tensor, sparse: torch.Tensor, w2: float, power: float,
                  cosine: torch.Tensor | None = None, slope: float = 0.0, pivot: float = 0.5) -> torch.Tensor:
    """Per-query sparse weights, shape ``(n_q, 1)``:
    ``w2·clip(gap(sparse)/gap(dense))^power·exp(slope·(pivot − max_j cosine[q, j]))``.

    ``dense``, ``sparse (n_q, n)`` are the scores as fused (``cos/τ`` or z-scores) and ``cosine
    (n_q, n)`` the raw cosines (needed when ``slope > 0``). Two zero gaps (ties on both sides)
    give ratio 1; one zero gap gives the clip bound.
    """
    w = torch.full(dense.shape[:-1], float(w2), dtype=dense.dtype)
    if power:
        gd, gs = top_gap(dense), top_gap(sparse)
        both_tied = (gd <= 0) & (gs <= 0)
        ratio = torch.where(both_tied, 1.0, gs.clamp_min(0) / gd.clamp_min(0))
        ratio = ratio.nan_to_num(nan=1.0, posinf=CONFIDENCE_CLIP).clamp(1 / CONFIDENCE_CLIP, CONFIDENCE_CLIP)
        w = w * ratio.pow(power)
    if slope:
        w = w * torch.exp(slope * (pivot - cosine.amax(-1)))
    return w.unsqueeze(-1)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """Row-wise standardisation (population std); constant rows become 0."""
    centred = x - x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, correction=0, keepdim=True)
    constant = x.amax(dim=-1, keepdim=True) == x.amin(dim=-1, keepdim=True)
    return torch.where(constant, 0.0, centred / torch.where(constant, 1.0, std))


@dataclass(frozen=True)
class FusionConfig:
    """Hybrid-scoring parameters; calling it fuses two score matrices (see :func:`fuse`).

    Attributes:
        method: ``"raw"``, ``"calibrated"`` or ``"rrf"``.
        w1, w2: non-negative weights of the dense and sparse scores (use the training values).
        tau: dense temperature for ``"calibrated"`` (use the trained τ).
        normalize: ``None`` or ``"zscore"`` (``"calibrated"`` only).
        k_rrf: RRF constant (Cormack et al. 2009).
        confidence_power: ``p ≥ 0`` of the query-dependent sparse weight (``"calibrated"``
            only; 0: the fixed weight ``w2``). Makes the fusion per-query, like z-scores.
        cosine_slope, cosine_pivot: ``β ≥ 0`` and ``c0`` of the dense-level factor
            ``exp(β·(c0 − max cos))`` of the sparse weight (``"calibrated"`` only; β = 0: none).
    """

    method: str = "calibrated"
    w1: float = 1.0
    w2: float = 1.0
    tau: float = 0.07
    normalize: str | None = None
    k_rrf: float = 60.0
    confidence_power: float = 0.0
    cosine_slope: float = 0.0
    cosine_pivot: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.normalize is not None and self.method != "calibrated":
            raise ValueError("normalize applies to method='calibrated' only")
        if (self.confidence_power or self.cosine_slope) and self.method != "calibrated":
            raise ValueError("confidence_power and cosine_slope apply to method='calibrated' only")
        if (self.w1 < 0 or self.w2 < 0 or self.tau <= 0 or self.k_rrf < 0 or self.confidence_power < 0
                or self.cosine_slope < 0):
            raise ValueError(f"need w1, w2 >= 0, tau > 0, k_rrf >= 0; got {self}")

    def __call__(self, dense: Any, sparse: Any) -> torch.Tensor:
        d, s = _as_pair(dense, sparse)
        if self.method == "raw":
            return self.w1 * d + self.w2 * s
        if self.method == "rrf":
            return sum(1.0 / (self.k_rrf + competition_ranks(x).double()) for x in (d, s))
        cosine = d
        d, s = (_zscore(d), _zscore(s)) if self.normalize == "zscore" else (d / self.tau, s)
        w2 = (query_weights(d, s, self.w2, self.confidence_power, cosine, self.cosine_slope, self.cosine_pivot)
              if self.confidence_power or self.cosine_slope else self.w2)
        return self.w1 * d + w2 * s

    @property
    def per_query(self) -> bool:
        """True when a query's fused scores depend on its other items (ranks, z-scores, gaps)."""
        return (self.method == "rrf" or self.normalize is not None or self.confidence_power > 0
                or self.cosine_slope > 0)


def _as_pair(dense: Any, sparse: Any) -> tuple[torch.Tensor, torch.Tensor]:
    d, s = torch.as_tensor(dense), torch.as_tensor(sparse)
    if d.shape != s.shape or d.dim() != 2:
        raise ValueError(f"dense {tuple(d.shape)} and sparse {tuple(s.shape)} must be equal 2-D shapes")
    dtype = torch.promote_types(d.dtype, s.dtype)
    dtype = dtype if dtype.is_floating_point else torch.float64
    return d.to(dtype), s.to(dtype)


def fuse(dense: Any, sparse: Any, method: str = "calibrated", **params: Any) -> torch.Tensor:
    """Fuse score matrices ``dense (n_q, n_items)`` and ``sparse (n_q, n_items)``.

    ``params`` are :class:`FusionConfig` fields (``w1``, ``w2``, ``tau``, ``normalize``, ``k_rrf``,
    ``confidence_power``, ``cosine_slope``, ``cosine_pivot``).
    Returns a float tensor ``(n_q, n_items)``, higher = better. ``"raw"``/``"calibrated"`` keep the
    promoted floating dtype of the inputs (integers → float64); ``"rrf"`` is float64.
    RRF ranks and z-scores are computed over the items given, i.e. per row of the matrix.

    Example::

        >>> fuse([[0.9, 0.1]], [[1.0, 300.0]], "raw", w1=0.1, w2=0.1).argmax(1)
        tensor([1])
        >>> fuse([[0.9, 0.1]], [[1.0, 300.0]], "calibrated", w1=0.1, w2=0.1, tau=1e-4).argmax(1)
        tensor([0])
    """
    return FusionConfig(method=method, **params)(dense, sparse)


def fuse_candidates(
    ids: Sequence[Any],
    dense: Sequence[Any],
    sparse: Sequence[Any],
    method: str = "calibrated",
    k: int | None = None,
    **params: Any,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fuse per-query candidate lists (index search) and sort them.

    Contract: for query ``i``, ``ids[i]`` holds ``m_i`` unique candidate ids (e.g. the union of
    the dense and the sparse index top-k') and ``dense[i]``, ``sparse[i]`` hold *both* exact scores
    of every candidate, shape ``(m_i,)`` — a candidate found by one index only must have its other
    score computed exactly by the caller (cosine / sparse dot product), never filled with 0.
    RRF ranks, z-scores and the confidence gaps are computed within the candidate set; a candidate's rank there equals
    its corpus rank whenever all higher-scoring items are candidates (true for the top-k' of each
    index), and is at most its corpus rank otherwise.

    Returns:
        one ``(ids, fused_scores)`` pair of numpy arrays per query, sorted by descending fused
        score, ties by ascending id, truncated to ``k`` when given.
    """
    config = FusionConfig(method=method, **params)
    return [_fuse_one(config, i, d, s, k) for i, d, s in zip(ids, dense, sparse, strict=True)]


def _fuse_one(config: FusionConfig, ids: Any, dense: Any, sparse: Any, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(np.unique(ids)) != len(ids):
        raise ValueError("candidate ids must be a 1-D list of unique ids")
    fused = config(torch.as_tensor(dense)[None], torch.as_tensor(sparse)[None])[0].numpy()
    if fused.shape != ids.shape:
        raise ValueError(f"{len(ids)} ids but {fused.shape[0]} scores")
    order = np.lexsort((ids, -fused))[:k]
    return ids[order], fused[order]
