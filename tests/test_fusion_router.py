"""benchmarks/fusion_router.py: concepts never straddle folds, the router learns a separable
hand-made case, falls back to the best fixed weight, and its figures on small random heads are
ordered as they must be (dense and routed ≤ the oracle over the router's grid)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import fusion_router as router_lib  # noqa: E402
from hybrid_levers import load_runs  # noqa: E402

from tests.data_fixtures import repeated_feature_split, saved_sweep_run  # noqa: E402


def test_concept_groups_join_queries_through_shared_items():
    # q0–i0–q1 share a concept through image 0; q1–i1–q2 chains q2 in; q3 alone with i2
    relevant = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]], bool)
    g = router_lib.concept_groups(relevant)
    assert g[0] == g[1] == g[2] and g[3] != g[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_folds_never_split_a_group_and_balance_sizes(seed):
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 40, 300)
    folds = router_lib.grouped_folds(groups, 5, seed)
    for g in np.unique(groups):
        assert len(np.unique(folds[groups == g])) == 1
    sizes = np.bincount(folds, minlength=5)
    assert set(np.unique(folds)) == set(range(5))
    assert sizes.max() - sizes.min() <= np.bincount(groups).max()


def test_router_learns_which_weight_a_separable_feature_asks_for():
    # feature > 0: only weight index 0 (dense) serves the query; < 0: only index 2 (sparse);
    # index 1 serves nobody. Half the queries are served by every weight (not informative).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 1))
    hits = np.zeros((3, 200), bool)
    hits[0, x[:, 0] > 0] = True
    hits[2, x[:, 0] <= 0] = True
    hits[:, :40] = True
    router = router_lib.Router(10.0).fit(x, hits)
    new = np.array([[2.0], [-2.0], [1.5], [-0.7]])
    assert router.route(new).tolist() == [0, 2, 0, 2]
    assert router_lib.routed_hits(hits, router.route(x))[40:].mean() > 0.95


def test_router_without_informative_queries_falls_back_to_the_best_fixed_weight():
    hits = np.zeros((3, 6), bool)
    hits[1] = True          # weight 1 serves everyone: no informative query
    hits[0, :2] = True
    router = router_lib.Router(1.0).fit(np.arange(6.0)[:, None], hits)
    assert router.route(np.zeros((4, 1))).tolist() == [1, 1, 1, 1]


def test_query_features_agreement_columns_on_a_hand_case():
    dense = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    sparse = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    text_sparse = torch.tensor([[0.0, 2.0, 1.0], [0.5, 0.0, 0.0]]).to_sparse_csr()
    q = {"dense": dense, "sparse": sparse, "keep": torch.tensor([True, True]),
         "text_dense": torch.zeros(2, 3), "text_sparse": text_sparse}
    f = router_lib.query_features(q, 0.5, "shape", top=2)
    assert f.shape == (2, 18)
    assert f[:, 8].tolist() == [0.0, 1.0]                             # top-2 overlap
    assert f[:, 9].tolist() == pytest.approx([np.log1p(3), 0.0])      # rank of dense top-1 in sparse
    assert f[:, 11].tolist() == [0.0, 1.0]                            # the top-1s coincide
    assert f[:, 12].tolist() == [-3.0, 0.0]                           # dense loses by taking sparse's top-1
    assert f[:, 14].tolist() == pytest.approx([np.log1p(2), np.log1p(1)])  # nnz
    assert f[:, 15].tolist() == [2.0, 0.5]                            # largest term weight
    assert router_lib.query_features(q, 0.5, "content", top=2).shape == (2, 21)


def test_measure_orders_figures_under_the_oracle(tmp_path):
    runs = str(tmp_path / "runs.jsonl")
    saved_sweep_run(runs)
    rng = np.random.default_rng(0)
    val, test = repeated_feature_split(rng, 60, 80, 120), repeated_feature_split(rng, 80, 100, 150)
    row = load_runs(runs, ["joint-x"])[0]
    out = router_lib.measure(runs, row, val, test, router_lib.GRID, folds=3, repeats=1)
    for key in ("dense", "fixed_a", "router_a_shape", "router_a_content", "fixed_b", "router_b_shape",
                "router_b_content", "router_in_shape", "router_in_content"):
        assert out[key]["r1"] <= out["oracle_grid"]["r1"] + 1e-12
    assert out["oracle_grid"]["r1"] <= out["oracle_fine"]["r1"] + 1e-12
    from sdray import config as config_lib

    q = router_lib.t2i_queries(router_lib.heads_of(runs, row, config_lib.SdrayConfig()), test)
    assert out["dense"]["r1"] == pytest.approx(router_lib.top1_hits(q["dense"], q["relevant"]).float().mean().item())
    assert out["n_test"] == len(q["dense"])
