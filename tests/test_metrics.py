"""sdray.metrics against brute-force loop references (ties, multi-relevant, empty queries)."""

import numpy as np
import pytest
import torch

from sdray.metrics import (
    first_relevant_ranks,
    flops,
    mean_nnz,
    metrics_from_ranks,
    ranking_metrics,
    relevance_from_pairs,
    retrieval_metrics,
)

sp = pytest.importorskip("scipy.sparse")
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


def ref_rank(scores_row, rel_row, ties="pessimistic"):
    """Sort by descending score; within a tie non-relevant first (pessimistic) or last."""
    tie_key = (lambda j: rel_row[j]) if ties == "pessimistic" else (lambda j: not rel_row[j])
    order = sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], tie_key(j)))
    return next((pos + 1 for pos, j in enumerate(order) if rel_row[j]), 0)


def ref_metrics(scores, rel, ties="pessimistic"):
    ranks = [ref_rank(list(s), list(r), ties) for s, r in zip(scores.tolist(), rel.tolist())]
    ranks = [r for r in ranks if r > 0]
    out = {f"R@{k}": sum(r <= k for r in ranks) / len(ranks) for k in (1, 5, 10)}
    out["MRR@10"] = sum(1 / r for r in ranks if r <= 10) / len(ranks)
    return out


def tied_problem(seed, n_q=60, n_items=45):
    """Integer scores in 0..4 (many ties), 0..6 relevant items per row, some rows empty."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=(n_q, n_items)).astype(np.float32)
    rel = rng.random((n_q, n_items)) < rng.choice([0.0, 0.03, 0.15], size=(n_q, 1))
    return scores, rel


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("seed", range(4))
def test_ranks_and_metrics_match_bruteforce(seed, ties):
    scores, rel = tied_problem(seed)
    assert (~rel.any(1)).sum() > 0 and (rel.sum(1) > 1).sum() > 0
    ranks = first_relevant_ranks(scores, rel, ties=ties)
    expected = [ref_rank(list(s), list(r), ties) for s, r in zip(scores.tolist(), rel.tolist())]
    np.testing.assert_array_equal(ranks, expected)
    got = ranking_metrics(scores, rel, ties=ties)
    assert got == pytest.approx(ref_metrics(scores, rel, ties), abs=1e-12)


def test_tie_rule_hand_example():
    scores = np.array([[3.0, 2.0, 2.0, 2.0, 1.0]])
    rel = np.array([[False, False, True, False, True]])
    assert first_relevant_ranks(scores, rel).tolist() == [4]  # 1 higher + 2 tied non-relevant
    assert first_relevant_ranks(scores, rel, ties="optimistic").tolist() == [2]


def test_empty_queries_excluded():
    scores = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    rel = np.array([[True, False], [False, False], [True, False]])
    assert first_relevant_ranks(scores, rel).tolist() == [1, 0, 2]
    m = ranking_metrics(scores, rel)
    assert m == {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0, "MRR@10": 0.75}
    with pytest.raises(ValueError):
        ranking_metrics(scores, np.zeros_like(rel))


def test_mrr_cutoff():
    assert metrics_from_ranks(np.array([11, 2, 0]))["MRR@10"] == pytest.approx(0.25)
    assert metrics_from_ranks(np.array([11, 2]))["R@10"] == 0.5


def test_chunked_equals_unchunked_and_input_types():
    scores, rel = tied_problem(7, n_q=53)
    base = first_relevant_ranks(scores, rel, chunk_size=10_000)
    variants = [
        (scores, rel, 7),
        (scores, rel, 1),
        (torch.from_numpy(scores), torch.from_numpy(rel), 5),
        (scores.astype(np.int64), rel.astype(np.uint8), 3),
        (torch.from_numpy(scores).double(), torch.from_numpy(rel).to_sparse(), 8),
        (scores, torch.from_numpy(rel).to_sparse_csr(), 4),
        (scores, sp.csr_matrix(rel), 6),
        (scores, sp.coo_array(rel.astype(np.float32)), 1024),
    ]
    for s, r, c in variants:
        np.testing.assert_array_equal(first_relevant_ranks(s, r, chunk_size=c), base)


def test_sparse_relevance_ignores_stored_zeros_and_sums_duplicates():
    scores = np.array([[2.0, 1.0, 0.0]])
    # stored explicit zero at column 0; duplicate entries at column 2 (1 + -1 = 0 → not relevant)
    m = sp.coo_matrix((np.array([0.0, 1.0, 1.0, -1.0]), (np.zeros(4, int), np.array([0, 1, 2, 2]))), shape=(1, 3))
    assert first_relevant_ranks(scores, m).tolist() == [2]


def test_retrieval_metrics_both_directions():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(20, 50)).astype(np.float32)  # images × texts
    pairs = [(t // 3 % 20, t) for t in range(50)] + [(5, 0), (6, 1)]  # some texts name two images
    rel = relevance_from_pairs(pairs, 20, 50)
    out = retrieval_metrics(torch.from_numpy(scores), rel)
    assert out["t2i"] == pytest.approx(ref_metrics(scores.T, rel.T), abs=1e-12)
    assert out["i2t"] == pytest.approx(ref_metrics(scores, rel), abs=1e-12)
    assert set(out["t2i"]) == {"R@1", "R@5", "R@10", "MRR@10"}
    assert all(type(v) is float and 0 <= v <= 1 for d in out.values() for v in d.values())
    sparse_rel = relevance_from_pairs(pairs, 20, 50, sparse=True)
    assert retrieval_metrics(scores, sparse_rel, chunk_size=6) == out


def test_relevance_from_pairs():
    rel = relevance_from_pairs([(0, 1), (0, 1), (2, 0)], 3, 2)
    np.testing.assert_array_equal(rel, [[False, True], [False, False], [True, False]])
    np.testing.assert_array_equal(relevance_from_pairs([(0, 1), (0, 1), (2, 0)], 3, 2, sparse=True).to_dense(), rel)
    assert relevance_from_pairs([], 2, 2).sum() == 0
    with pytest.raises(ValueError):
        relevance_from_pairs([(3, 0)], 3, 2)


def test_nan_and_shape_errors():
    with pytest.raises(ValueError):
        first_relevant_ranks(np.array([[np.nan, 1.0]]), np.array([[True, False]]))
    with pytest.raises(ValueError):
        first_relevant_ranks(np.zeros((2, 3)), np.zeros((3, 2), bool))
    with pytest.raises(ValueError):
        first_relevant_ranks(np.zeros((2, 3)), np.zeros((2, 3), bool), ties="random")


def test_many_chunks_both_directions():
    """Chunk boundaries in both directions; memory is bounded by chunk_size × n_items."""
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 1200, 6000
    scores = torch.randn(n_img, n_txt, generator=g)
    pairs = [(t // 5, t) for t in range(n_txt)]
    rel = relevance_from_pairs(pairs, n_img, n_txt, sparse=True)
    texts = torch.arange(n_txt)
    scores[texts // 5, texts] = torch.where(texts % 2 == 0, 100.0, -100.0)  # even texts top-1, odd last
    out = retrieval_metrics(scores, rel, chunk_size=512)
    assert out["t2i"]["R@1"] == 0.5
    assert out["i2t"]["R@1"] == 1.0
    assert retrieval_metrics(scores, relevance_from_pairs(pairs, n_img, n_txt), chunk_size=7000) == out


def ref_flops(q, d):
    return np.mean([[np.sum((qi != 0) & (dj != 0)) for dj in d] for qi in q])


def test_flops_and_nnz_hand_example():
    q = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    d = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    # P(q≠0) = (1/2, 0, 1), P(d≠0) = (1/3, 2/3, 0)  →  1/6
    assert flops(q, d) == pytest.approx(1 / 6)
    assert mean_nnz(q) == 1.5 and mean_nnz(d) == 1.0


def test_flops_and_nnz_random_vs_loop_and_sparse_inputs():
    rng = np.random.default_rng(0)
    q = rng.random((23, 40)) * (rng.random((23, 40)) < 0.2)
    d = rng.random((31, 40)) * (rng.random((31, 40)) < 0.4)
    expected = ref_flops(q, d)
    tq = torch.from_numpy(q).float()
    for qq, dd in [(q, d), (tq, torch.from_numpy(d)), (tq.to_sparse(), sp.csr_matrix(d)), (tq.to_sparse_csr(), d)]:
        assert flops(qq, dd) == pytest.approx(expected, rel=1e-12)
    for x in (q, torch.from_numpy(q), torch.from_numpy(q).to_sparse_csr(), sp.csr_array(q)):
        assert mean_nnz(x) == pytest.approx((q != 0).sum() / len(q), rel=1e-12)
    with pytest.raises(ValueError):
        flops(q, d[:, :10])
