"""sdray.fusion: closed forms, RRF against a loop, candidate lists, and the scale property."""

import numpy as np
import pytest
import torch

from sdray.fusion import FusionConfig, competition_ranks, fuse, fuse_candidates
from sdray.metrics import ranking_metrics


def random_scores(seed, n_q=7, n=30):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n_q, n)), rng.gamma(2.0, 50.0, (n_q, n))


def loop_ranks(row):
    return [1 + sum(other > x for other in row) for x in row]


def loop_rrf(dense, sparse, k=60.0):
    return np.array([
        [1 / (k + rd) + 1 / (k + rs) for rd, rs in zip(loop_ranks(d), loop_ranks(s))]
        for d, s in zip(dense.tolist(), sparse.tolist())
    ])


def test_raw_and_calibrated_closed_forms():
    d, s = random_scores(0)
    np.testing.assert_allclose(fuse(d, s, "raw", w1=0.1, w2=0.2).numpy(), 0.1 * d + 0.2 * s, rtol=1e-12)
    np.testing.assert_allclose(
        fuse(d, s, "calibrated", w1=0.1, w2=0.2, tau=0.05).numpy(), 0.1 * d / 0.05 + 0.2 * s, rtol=1e-12
    )
    out = fuse(torch.tensor(d, dtype=torch.float32), torch.tensor(s, dtype=torch.float32), "raw")
    assert out.dtype == torch.float32 and out.shape == d.shape


def test_calibrated_zscore():
    d, s = random_scores(1)
    d[0] = 0.3  # constant row: z = 0 (0.3 is inexact in binary: a naive (x - mean) / std gives ±1 or NaN)

    def z(x):
        constant = x.max(1, keepdims=True) == x.min(1, keepdims=True)
        return np.where(constant, 0.0, (x - x.mean(1, keepdims=True)) / np.where(constant, 1.0, x.std(1, keepdims=True)))

    got = fuse(d, s, "calibrated", w1=0.1, w2=0.2, tau=0.01, normalize="zscore").numpy()
    np.testing.assert_allclose(got, 0.1 * z(d) + 0.2 * z(s), rtol=1e-10, atol=1e-12)
    assert np.isfinite(got).all()


def test_competition_ranks_with_ties():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, (9, 25)).astype(np.float32)
    np.testing.assert_array_equal(competition_ranks(torch.from_numpy(x)).numpy(), [loop_ranks(r) for r in x.tolist()])
    assert competition_ranks(torch.tensor([[5.0, 7.0, 5.0, 1.0]])).tolist() == [[2, 1, 2, 4]]


@pytest.mark.parametrize("k_rrf", [60.0, 0.0, 5.0])
def test_rrf_matches_loop_with_ties(k_rrf):
    rng = np.random.default_rng(3)
    d, s = rng.integers(0, 5, (8, 20)), rng.integers(0, 50, (8, 20))
    got = fuse(d, s, "rrf", k_rrf=k_rrf)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), loop_rrf(d, s, k_rrf), rtol=1e-14)


def test_rrf_ignores_score_scale():
    d, s = random_scores(4)
    np.testing.assert_array_equal(fuse(d, s, "rrf").numpy(), fuse(d * 3 - 1, np.exp(s / 100), "rrf").numpy())


def test_candidates_match_matrix_core_and_sort():
    d, s = random_scores(5, n_q=4, n=12)
    rng = np.random.default_rng(5)
    ids = [rng.permutation(100)[:m] for m in (12, 5, 1, 0)]
    cols = [rng.permutation(12)[: len(i)] for i in ids]
    for method in ("raw", "calibrated", "rrf"):
        out = fuse_candidates(ids, [d[q, c] for q, c in enumerate(cols)], [s[q, c] for q, c in enumerate(cols)], method, tau=0.05)
        for q, (got_ids, got_scores) in enumerate(out):
            expected = fuse(d[q : q + 1, cols[q]], s[q : q + 1, cols[q]], method, tau=0.05)[0].numpy()
            lookup = dict(zip(ids[q].tolist(), expected.tolist()))
            assert sorted(got_ids.tolist()) == sorted(ids[q].tolist())
            np.testing.assert_allclose(got_scores, [lookup[i] for i in got_ids.tolist()])
            assert np.all(np.diff(got_scores) <= 0)


def test_candidates_tie_break_k_and_errors():
    (ids, scores), = fuse_candidates([[9, 3, 7, 1]], [[0.5, 0.5, 0.9, 0.1]], [[1.0, 1.0, 1.0, 1.0]], "raw", k=3)
    assert ids.tolist() == [7, 3, 9] and scores.shape == (3,)
    (ids, _), = fuse_candidates([np.array(["b", "a"])], [[0.2, 0.2]], [[1.0, 1.0]], "rrf")
    assert ids.tolist() == ["a", "b"]
    with pytest.raises(ValueError):
        fuse_candidates([[1, 1]], [[0.1, 0.2]], [[1.0, 2.0]])
    with pytest.raises(ValueError):
        fuse_candidates([[1, 2]], [[0.1]], [[1.0]])
    with pytest.raises(ValueError):
        fuse_candidates([[1], [2]], [[0.1]], [[1.0]])


def test_candidate_union_ranks_equal_corpus_ranks_for_each_top_k():
    """Documented contract: in the union of both top-k' lists, each list's members keep their rank."""
    d, s = random_scores(6, n_q=1, n=200)
    top_d, top_s = np.argsort(-d[0])[:10], np.argsort(-s[0])[:10]
    union = np.union1d(top_d, top_s)
    corpus = competition_ranks(torch.from_numpy(d))[0].numpy()
    within = competition_ranks(torch.from_numpy(d[:, union]))[0].numpy()
    member = np.isin(union, top_d)
    np.testing.assert_array_equal(within[member], corpus[union[member]])
    assert np.all(within[~member] <= corpus[union[~member]])


def test_config_validation_and_call():
    cfg = FusionConfig(method="calibrated", w1=0.1, w2=0.1, tau=0.05)
    d, s = random_scores(7)
    np.testing.assert_array_equal(cfg(d, s).numpy(), fuse(d, s, "calibrated", w1=0.1, w2=0.1, tau=0.05).numpy())
    for bad in ({"method": "max"}, {"tau": 0.0}, {"w1": -1.0}, {"k_rrf": -1.0}, {"normalize": "minmax"},
                {"method": "raw", "normalize": "zscore"}):
        with pytest.raises(ValueError):
            FusionConfig(**bad)
    with pytest.raises(ValueError):
        fuse(d, s[:, :3])


def test_raw_ranks_like_sparse_alone_but_calibrated_does_not():
    """DESIGN.md §1 reference run: sparse scores in the 100s swamp cos ≤ 1 under w1·cos + w2·sparse.

    Dense is a good retriever here (the relevant item has cos 0.9, the rest ≤ 0.3), sparse is
    uninformative with scores 100…157 spaced 3 apart, w1 = w2 = 0.1, τ = 0.01.
    """
    rng = np.random.default_rng(8)
    n_q, n = 50, 20
    dense = rng.uniform(-0.3, 0.3, (n_q, n))
    target = rng.integers(0, n, n_q)
    dense[np.arange(n_q), target] = 0.9
    relevant = np.zeros((n_q, n), bool)
    relevant[np.arange(n_q), target] = True
    sparse = 100.0 + 3.0 * rng.permuted(np.tile(np.arange(n), (n_q, 1)), axis=1)
    raw = fuse(dense, sparse, "raw", w1=0.1, w2=0.1).numpy()
    calibrated = fuse(dense, sparse, "calibrated", w1=0.1, w2=0.1, tau=0.01).numpy()
    np.testing.assert_array_equal(np.argsort(-raw, 1), np.argsort(-sparse, 1))
    assert (np.argsort(-calibrated, 1) != np.argsort(-sparse, 1)).any()
    r1 = lambda x: ranking_metrics(x, relevant)["R@1"]
    assert r1(raw) == r1(sparse) < 0.2
    assert r1(calibrated) == r1(dense) == 1.0
