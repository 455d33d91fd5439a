"""benchmarks/fusion_ceiling.py: the pessimistic top-1 rule, and on small random heads the
figures agree with sdray.evaluation (dense, sparse, the sweep's hybrid) and are ordered as a
ceiling must be (a chosen weight ≤ the best weight on the split ≤ the per-query oracle)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
ceiling = pytest.importorskip("fusion_ceiling")


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
    from safetensors.torch import save_file

    from sdray.heads import RetrieverHeads

    torch.manual_seed(0)
    heads = RetrieverHeads(torch.nn.Linear(24, 16), torch.nn.Linear(20, 16), torch.randn(300, 16), tau_init=0.05)
    runs = str(tmp_path / "runs.jsonl")
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, f"{runs}.joint-x.e3.s1.safetensors")
    row = {"name": "joint-x", "epochs": 3, "seed": 1, "test": {"val_w2": 0.5, "val_w2_zscore": 0.2}}
    with open(runs, "w") as f:
        f.write(json.dumps(row) + "\n")
    rng = np.random.default_rng(0)

    def split(n_img: int, n_cap: int, n: int) -> dict:
        data = {"image_id": [f"img{i % n_img}" for i in range(n)], "caption": [f"c{i % n_cap}" for i in range(n)],
                "text_features": rng.standard_normal((n, 24)).astype(np.float32),
                "image_features": rng.standard_normal((n, 20)).astype(np.float32)}
        for i in range(n):
            data["image_features"][i] = data["image_features"][i % n_img]
            data["text_features"][i] = data["text_features"][i % n_cap]
        return data

    return runs, split(30, 40, 50), split(60, 75, 90)


def test_figures_agree_with_evaluation_and_form_a_ceiling(run):
    from sdray import config as config_lib
    from sdray.evaluation import evaluate_features, head_tau

    runs, val, test = run
    row = ceiling.load_runs(runs, ["joint-x"])[0]
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
