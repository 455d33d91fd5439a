"""sdray.evaluation: dedupe, CSR sparse scores, the DESIGN §4 result shape, fusion, the table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from sdray.config import from_dict
from sdray.evaluation import (dedupe, encode, evaluate_and_calibrate, evaluate_features, format_table, fused_metrics,
                              rsum, sparse_scores)
from sdray.heads import RetrieverHeads
from sdray.metrics import ranking_metrics, retrieval_metrics

HT, HI, D, V = 10, 14, 8, 40


def heads(seed=0):
    torch.manual_seed(seed)
    return RetrieverHeads(nn.Linear(HT, D), nn.Linear(HI, D), torch.randn(V, 6)).eval()


def test_dedupe_images_by_id_and_captions_by_text():
    image_rows, text_rows, pairs = dedupe(["a", "a", "b", "c", "b"], ["x", "y", "x", "z", "w"])
    assert image_rows.tolist() == [0, 2, 3]
    assert text_rows.tolist() == [0, 1, 3, 4]
    # "x" names images a and b: one caption relevant to two images
    assert pairs == [(0, 0), (0, 1), (1, 0), (2, 2), (1, 3)]


def test_csr_sparse_scores_equal_dense_products():
    h = heads()
    a_d, a_s = encode(h, torch.randn(7, HI).numpy(), "image", chunk=3)
    b_d, b_s = encode(h, torch.randn(5, HT).numpy(), "text", chunk=2)
    assert a_s.layout == torch.sparse_csr and a_s.shape == (7, V)
    got = sparse_scores(a_s, b_s, chunk=2)
    torch.testing.assert_close(got, a_s.to_dense() @ b_s.to_dense().T)
    assert torch.allclose(a_d.norm(dim=1), torch.ones(7))


def test_evaluate_features_shape_and_values():
    rng = np.random.default_rng(0)
    n = 12
    data = {"text_features": rng.normal(size=(n, HT)).astype(np.float32),
            "image_features": rng.normal(size=(n, HI)).astype(np.float32),
            "image_id": [f"i{k // 2}" for k in range(n)],          # 6 images, 2 captions each
            "caption": [f"c{k}" if k != 5 else "c4" for k in range(n)]}  # one repeated caption
    cfg = from_dict({"fusion": {"method": "calibrated"}})
    h = heads()
    res = evaluate_features(h, data, cfg, extra_fusions={"rrf": {"method": "rrf"}})
    assert res["n_images"] == 6 and res["n_texts"] == 11
    for d in ("t2i", "i2t"):
        assert set(res[d]) == {"dense", "sparse", "hybrid", "hybrid_rrf"}
        for rep in res[d].values():
            assert set(rep) == {"R@1", "R@5", "R@10", "MRR@10"}
            assert all(0.0 <= v <= 1.0 for v in rep.values())
    assert set(res["sparsity"]) == {"text_nnz", "image_nnz", "flops"}
    json.dumps(res)
    # dense metrics equal a direct computation on deduplicated items
    img = torch.as_tensor(data["image_features"][::2])
    txt = torch.as_tensor(np.delete(data["text_features"], 5, axis=0))
    with torch.no_grad():
        s = h.encode_image(img).dense @ h.encode_text(txt).dense.T
    rel = np.zeros((6, 11), bool)
    for k in range(n):
        t = k if k < 5 else (4 if k == 5 else k - 1)
        rel[k // 2, t] = True
    ref = retrieval_metrics(s.double(), rel)
    assert res["t2i"]["dense"] == pytest.approx(ref["t2i"])
    assert res["i2t"]["dense"] == pytest.approx(ref["i2t"])
    assert res["fusion"]["method"] == "calibrated" and res["fusion"]["tau"] == pytest.approx(h.tau.item())
    assert 0 <= rsum(res, "hybrid") <= 6
    table = format_table(res)
    assert "t2i" in table and "hybrid_rrf" in table and "nnz" in table


@pytest.mark.parametrize("fusion", [{"method": "calibrated", "w1": 1.0, "w2": 0.5, "tau": 0.1, "normalize": "zscore"},
                                    {"method": "rrf", "k_rrf": 2.0},
                                    {"method": "calibrated", "w1": 1.0, "w2": 0.5, "tau": 0.1, "confidence_power": 1.0}])
def test_per_query_fusion_normalises_over_each_querys_candidates(fusion):
    """Text→image z-scores/RRF ranks are taken over the images for one caption (as an index
    search does), not over the captions for one image."""
    rng = np.random.default_rng(3)
    n_i, n_t = 7, 9
    # sparse scores on very different scales per image row, so the two axes disagree
    dense = torch.as_tensor(rng.normal(size=(n_i, n_t)))
    sparse = torch.as_tensor(rng.gamma(1.0, size=(n_i, n_t)) * rng.uniform(1, 50, size=(n_i, 1)))
    rel = np.zeros((n_i, n_t), bool)
    rel[rng.integers(0, n_i, n_t), np.arange(n_t)] = True

    def per_query(d, s):  # one query at a time, items = the other side
        if fusion["method"] == "rrf":
            rank = lambda x: 1 + (x[None, :] > x[:, None]).sum(1)
            return 1 / (fusion["k_rrf"] + rank(d)) + 1 / (fusion["k_rrf"] + rank(s))
        if "confidence_power" in fusion:  # the weight from this query's top-1/top-2 gaps
            gap = lambda x: np.subtract(*np.sort(x)[::-1][:2])  # noqa: E731
            d = d / fusion["tau"]
            return fusion["w1"] * d + fusion["w2"] * (gap(s) / gap(d)) ** fusion["confidence_power"] * s
        z = lambda x: (x - x.mean()) / x.std()
        return fusion["w1"] * z(d) + fusion["w2"] * z(s)

    t2i = torch.stack([torch.as_tensor(per_query(dense[:, j].numpy(), sparse[:, j].numpy())) for j in range(n_t)])
    i2t = torch.stack([torch.as_tensor(per_query(dense[i].numpy(), sparse[i].numpy())) for i in range(n_i)])
    got = fused_metrics(dense, sparse, rel, fusion)
    assert got["t2i"] == pytest.approx(ranking_metrics(t2i, rel.T))
    assert got["i2t"] == pytest.approx(ranking_metrics(i2t, rel))
    wrong_axis = ranking_metrics(torch.stack([torch.as_tensor(per_query(dense[i].numpy(), sparse[i].numpy()))
                                              for i in range(n_i)]).T, rel.T)
    assert got["t2i"] != pytest.approx(wrong_axis)


def test_calibration_picks_the_best_sparse_weight_on_the_split():
    rng = np.random.default_rng(3)   # a split where the middle weight wins
    n = 40
    data = {"text_features": rng.normal(size=(n, HT)).astype(np.float32),
            "image_features": rng.normal(size=(n, HI)).astype(np.float32),
            "image_id": [f"i{k}" for k in range(n)], "caption": [f"c{k}" for k in range(n)]}
    h = heads(2)
    cfg = from_dict({"loss": {"method": "joint"}, "fusion": {"w2_grid": [0.01, 0.5, 3.0]}})
    res, chosen = evaluate_and_calibrate(h, data, cfg)
    tau = h.tau.item()
    each = {w2: rsum(evaluate_features(h, data, from_dict({"fusion": {"w1": 1.0, "w2": w2}})), "hybrid")
            for w2 in (0.01, 0.5, 3.0)}
    best = max(sorted(each), key=lambda w: each[w])
    assert best == 0.5 and len(set(each.values())) == 3
    assert (chosen.fusion.w1, chosen.fusion.w2) == (1.0, best)
    assert res["fusion"] == {"method": "calibrated", "w1": 1.0, "w2": best, "tau": tau}
    assert rsum(res, "hybrid") == pytest.approx(each[best]) and res["fusion_grid"] == pytest.approx(each)
    assert not any(k.startswith("hybrid_") for k in res["t2i"])
    assert cfg.fusion.w2 == 1.0, "the input config is left alone"
    # off, or for a dense model: plain evaluation with the configured fusion
    for off in (from_dict({"fusion": {"calibrate": False}}), from_dict({"loss": {"method": "dense"}})):
        res, same = evaluate_and_calibrate(h, data, off)
        assert same is off and res["fusion"]["w2"] == 1.0 and "fusion_grid" not in res
