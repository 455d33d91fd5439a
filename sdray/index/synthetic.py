"""Synthetic vectors shaped like a trained model's, for tests and benchmarks (no model needed).

Documents belong to latent topics. Dense: ``normalize(topic centre + noise)`` in ``dim`` dims.
Sparse: ``nnz`` uniform in ``[nnz_min, nnz_max]`` distinct terms, half from a Zipf-like global
term distribution (p ∝ 1/(rank+10)), half from the topic's own terms; log-normal weights.
Queries are noisy views of a target document: dense = ``normalize(doc + noise)``, sparse = a
subset of the document's terms plus Zipf noise terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdray.index.csr import CSR


@dataclass
class Synthetic:
    dense: np.ndarray
    sparse: CSR
    q_dense: np.ndarray
    q_sparse: CSR
    targets: np.ndarray  # the document each query was derived from


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _csr_from_pairs(rows: np.ndarray, terms: np.ndarray, vals: np.ndarray, n: int, vocab: int) -> CSR:
    key = rows.astype(np.int64) * vocab + terms.astype(np.int64)
    key, first = np.unique(key, return_index=True)
    rows, terms, vals = key // vocab, key % vocab, vals[first]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return CSR(indptr, terms.astype(np.int32), vals.astype(np.float32), vocab)


def make_synthetic(
    n_docs: int,
    n_queries: int = 100,
    dim: int = 256,
    vocab: int = 30522,
    nnz_min: int = 30,
    nnz_max: int = 80,
    query_nnz: tuple[int, int] = (10, 30),
    n_topics: int | None = None,
    seed: int = 0,
) -> Synthetic:
    rng = np.random.default_rng(seed)
    n_topics = n_topics or max(8, int(np.sqrt(n_docs)))
    centres = rng.standard_normal((n_topics, dim)).astype(np.float32)
    topic = rng.integers(0, n_topics, n_docs)
    dense = np.empty((n_docs, dim), np.float32)
    for a in range(0, n_docs, 100_000):
        b = min(n_docs, a + 100_000)
        dense[a:b] = _normalize(centres[topic[a:b]] + 1.2 * rng.standard_normal((b - a, dim)).astype(np.float32))

    ranks = np.arange(vocab)
    p = 1.0 / (ranks + 10.0)
    p /= p.sum()
    perm = rng.permutation(vocab)  # Zipf rank -> term id
    topic_terms = rng.integers(0, vocab, (n_topics, 64))

    nnz = rng.integers(nnz_min, nnz_max + 1, n_docs)
    n_glob = nnz // 2
    n_top = nnz - n_glob + 4  # a few spare draws: duplicates are dropped
    rows = np.concatenate([np.repeat(np.arange(n_docs), n_glob), np.repeat(np.arange(n_docs), n_top)])
    glob_terms = perm[rng.choice(vocab, size=int(n_glob.sum()), p=p)]
    top_rows = np.repeat(np.arange(n_docs), n_top)
    top_terms = topic_terms[topic[top_rows], rng.integers(0, 64, len(top_rows))]
    terms = np.concatenate([glob_terms, top_terms])
    vals = np.exp(rng.normal(-0.5, 0.6, len(terms))).astype(np.float32)
    sparse = _csr_from_pairs(rows, terms, vals, n_docs, vocab)

    targets = rng.integers(0, n_docs, n_queries)
    q_dense = _normalize(dense[targets] + 0.05 * rng.standard_normal((n_queries, dim)).astype(np.float32))
    q_rows, q_terms, q_vals = [], [], []
    for qi, t in enumerate(targets):
        ti, tv = sparse.row(int(t))
        m = int(rng.integers(query_nnz[0], query_nnz[1] + 1))
        own = rng.choice(len(ti), size=min(len(ti), max(1, int(m * 0.6))), replace=False)
        noise = perm[rng.choice(vocab, size=m - len(own), p=p)]
        q_terms.append(np.concatenate([ti[own], noise]))
        q_vals.append(np.concatenate([tv[own] * np.exp(rng.normal(0, 0.3, len(own))), np.exp(rng.normal(-0.5, 0.6, len(noise)))]))
        q_rows.append(np.full(len(own) + len(noise), qi))
    q_sparse = _csr_from_pairs(np.concatenate(q_rows), np.concatenate(q_terms), np.concatenate(q_vals).astype(np.float32), n_queries, vocab)
    return Synthetic(dense, sparse, q_dense, q_sparse, targets)
