"""benchmarks/fusion_ceiling.py: the pessimistic top-1 rule, and on small random heads the
figures agree with sdray.evaluation (dense, sparse, the sweep's hybrid) and are ordered as a
ceiling must be (a chosen weight ≤ the best weight on the split ≤ the per-query oracle)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
ceiling = pytest.importorskip("fusion_ceiling")
from hybrid_levers import load_runs  # noqa: E402

from tests.data_fixtures import repeated_feature_split, saved_sweep_run  # noqa: E402


def test_top1_hits_counts_a_tie_with_a_non_relevant_item_as_a_miss():
    scores = torch.tensor([[3.0, 1.0, 3.0], [1.0, 2.0, 0.0], [5.0, 4.0, 0.0]])
    relevant = torch.tensor([[True, False, False], [False, True, True], [False, True, False]])
    assert ceiling.top1_hits(scores, relevant).tolist() == [False, True, False]


def test_per_query_oracle_finds_a_weight_no_single_weight_serves():
    # query 0 needs the sparse score (w2 large), query 1 the dense one (w2 = 0)
    dense = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    sparse = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    relevant = torch.tensor([[True, False], [True, False]])
    hits = ceiling.hits_per_weight(dense, sparse, relevant)
    assert hits.any(0).all()                   # the oracle serves both queries
    assert hits.float().mean(1).max() == 0.5   # no single weight does


@pytest.fixture
def run(tmp_path):
    runs = str(tmp_path / "runs.jsonl")
    saved_sweep_run(runs)
    rng = np.random.default_rng(0)
    return runs, repeated_feature_split(rng, 30, 40, 50), repeated_feature_split(rng, 60, 75, 90)


def test_figures_agree_with_evaluation_and_form_a_ceiling(run):
    from sdray import config as config_lib
    from sdray.evaluation import evaluate_features, head_tau

    runs, val, test = run
    row = load_runs(runs, ["joint-x"])[0]
    out = ceiling.measure(runs, row, val, test)
    cfg = config_lib.SdrayConfig()
    heads = ceiling.heads_of(runs, row, cfg)
    ref = evaluate_features(heads, test, cfg, {"s": {"method": "calibrated", "w1": 1.0, "w2": 0.5,
                                                     "tau": head_tau(heads)}})
    assert out["dense"] == pytest.approx(ref["t2i"]["dense"]["R@1"])
    assert out["sparse"] == pytest.approx(ref["t2i"]["sparse"]["R@1"])
    assert out["hybrid_sweep"] == pytest.approx(ref["t2i"]["hybrid_s"]["R@1"])
    for label in ("cal", "z"):
        assert out[f"{label}_val"] <= out[f"{label}_test"] <= out["oracle"]
    assert max(out["dense"], out["sparse"], out["hybrid_sweep"]) <= out["cal_test"]
    assert out["either"] <= out["oracle"]
    table = ceiling.table([("joint-x", 1, out)])
    assert "| joint-x | 1 |" in table
