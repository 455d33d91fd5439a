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


def loop_query_weights(dense, sparse, w2, p, clip=1e4):
    out = []
    for d, s in zip(dense.tolist(), sparse.tolist()):
        gd, gs = np.subtract(*sorted(d, reverse=True)[:2]), np.subtract(*sorted(s, reverse=True)[:2])
        ratio = 1.0 if gd <= 0 and gs <= 0 else (clip if gd <= 0 else gs / gd)
        out.append(w2 * min(max(ratio, 1 / clip), clip) ** p)
    return np.array(out)[:, None]


@pytest.mark.parametrize("normalize", [None, "zscore"])
def test_confidence_weight_closed_form_and_shapes(normalize):
    d, s = random_scores(11)
    d[1, :2] = 0.7  # a tied dense top-2: gap 0, the ratio hits the clip
    d[2, :2], s[2, :2] = 0.95, 500.0  # both sides tied: ratio 1
    got = fuse(d, s, "calibrated", w1=0.5, w2=0.3, tau=0.05, normalize=normalize, confidence_power=1.5).numpy()
    if normalize:
        z = lambda x: (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)  # noqa: E731
        dn, sn = z(d), z(s)
    else:
        dn, sn = d / 0.05, s
    np.testing.assert_allclose(got, 0.5 * dn + loop_query_weights(dn, sn, 0.3, 1.5) * sn, rtol=1e-9)
    assert got.shape == d.shape and np.isfinite(got).all()
    one_item = fuse(d[:, :1], s[:, :1], "calibrated", tau=0.05, confidence_power=1.0)
    np.testing.assert_allclose(one_item.numpy(), d[:, :1] / 0.05 + s[:, :1])  # no gap: ratio 1


def test_confidence_power_zero_is_the_fixed_fusion_and_small_powers_approach_it():
    d, s = random_scores(12, n_q=40)
    fixed = fuse(d, s, "calibrated", w2=0.2, tau=0.05)
    np.testing.assert_array_equal(fuse(d, s, "calibrated", w2=0.2, tau=0.05, confidence_power=0.0).numpy(),
                                  fixed.numpy())
    tiny = fuse(d, s, "calibrated", w2=0.2, tau=0.05, confidence_power=1e-9)
    np.testing.assert_array_equal(np.argsort(-tiny.numpy(), 1), np.argsort(-fixed.numpy(), 1))
    s_equal_gaps = d / 0.05 * 7.0  # every query's sparse gap is 7× its dense gap: one weight for all
    adaptive = fuse(d, s_equal_gaps, "calibrated", w2=0.2, tau=0.05, confidence_power=2.0)
    np.testing.assert_allclose(adaptive.numpy(),
                               fuse(d, s_equal_gaps, "calibrated", w2=0.2 * 49.0, tau=0.05).numpy(), rtol=1e-12)


def test_confidence_weight_ranks_a_case_no_fixed_weight_can():
    """Query A: dense sure and right (gap 10), sparse unsure and wrong (scores 50 vs 49). Query
    B: dense unsure and wrong (gap 2), sparse sure and right (gap 5). A needs w2 < 0.2, B needs
    w2 > 0.4: no fixed weight ranks both right, the gap-ratio weight (w2 = 0.3, p = 1) does."""
    dense = np.array([[10.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # already cos/τ (tau = 1)
    sparse = np.array([[0.0, 50.0, 49.0], [0.0, 0.0, 5.0]])
    relevant = np.array([[True, False, False], [False, False, True]])
    r1 = lambda f: ranking_metrics(f, relevant)["R@1"]  # noqa: E731
    assert max(r1(fuse(dense, sparse, "calibrated", w2=w, tau=1.0)) for w in np.logspace(-4, 4, 161)) == 0.5
    assert r1(fuse(dense, sparse, "calibrated", w2=0.3, tau=1.0, confidence_power=1.0)) == 1.0


def test_confidence_power_is_per_query_and_validated():
    assert FusionConfig(confidence_power=1.0).per_query and not FusionConfig().per_query
    assert FusionConfig(normalize="zscore").per_query and FusionConfig(method="rrf").per_query
    for bad in ({"method": "raw", "confidence_power": 1.0}, {"confidence_power": -1.0}):
        with pytest.raises(ValueError):
            FusionConfig(**bad)
    d, s = random_scores(13, n_q=3, n=12)
    cands = fuse_candidates([np.arange(12)] * 3, list(d), list(s), w2=0.5, tau=0.05, confidence_power=1.0)
    core = fuse(d, s, "calibrated", w2=0.5, tau=0.05, confidence_power=1.0).numpy()
    for (ids, fused), row in zip(cands, core):
        np.testing.assert_allclose(fused, row[ids], rtol=1e-12)
        np.testing.assert_array_equal(ids, np.argsort(-row, kind="stable"))


def test_cosine_slope_closed_form_limit_and_a_case_no_fixed_weight_can_rank():
    d, s = random_scores(14)
    got = fuse(d, s, "calibrated", w2=0.3, tau=0.05, cosine_slope=4.0, cosine_pivot=0.2).numpy()
    np.testing.assert_allclose(got, d / 0.05 + 0.3 * np.exp(4.0 * (0.2 - d.max(1, keepdims=True))) * s, rtol=1e-12)
    both = fuse(d, s, "calibrated", w2=0.3, tau=0.05, confidence_power=1.0, cosine_slope=4.0).numpy()
    dn = d / 0.05
    np.testing.assert_allclose(
        both, dn + loop_query_weights(dn, s, 0.3, 1.0) * np.exp(4.0 * (0.5 - d.max(1, keepdims=True))) * s, rtol=1e-12)
    flat = np.tile(d[:1], (len(d), 1))  # every query has the same best cosine: one weight for all
    np.testing.assert_allclose(fuse(flat, s, "calibrated", w2=0.3, tau=0.05, cosine_slope=4.0).numpy(),
                               fuse(flat, s, "calibrated", w2=0.3 * np.exp(4.0 * (0.5 - d[0].max())), tau=0.05).numpy(),
                               rtol=1e-12)
    # A: dense matches well (best cos 0.9) and is right, sparse wrong (50 vs 49): needs w2 < 0.18;
    # B: dense matches poorly (best cos 0.2) and is wrong, sparse right (gap 5): needs w2 > 0.4
    cos = np.array([[0.9, 0.0, 0.0], [0.0, 0.2, 0.0]])
    sparse = np.array([[0.0, 50.0, 49.0], [0.0, 0.0, 5.0]])
    relevant = np.array([[True, False, False], [False, False, True]])
    r1 = lambda f: ranking_metrics(f, relevant)["R@1"]  # noqa: E731
    assert max(r1(fuse(cos, sparse, "calibrated", w2=w, tau=0.1)) for w in np.logspace(-4, 4, 161)) == 0.5
    assert r1(fuse(cos, sparse, "calibrated", w2=0.3, tau=0.1, cosine_slope=10.0)) == 1.0
    with pytest.raises(ValueError):
        FusionConfig(method="rrf", cosine_slope=1.0)
    assert FusionConfig(cosine_slope=1.0).per_query
