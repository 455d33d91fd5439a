"""benchmarks/hybrid_levers.py on small random heads: through an index whose candidates cover the
split, the hybrid equals brute force (both fusions); fewer candidates never help the
per-document fusion; top-k pruning caps nnz."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
levers = pytest.importorskip("hybrid_levers")


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
        f.write(json.dumps({**row, "name": "other"}) + "\n" + json.dumps(row) + "\n")
    rng = np.random.default_rng(0)
    n_img = 60
    image_id = [f"img{i % n_img}" for i in range(90)]          # 30 images with two captions
    caption = [f"caption {i % 75}" for i in range(90)]         # 15 captions on two images
    data = {"image_id": image_id, "caption": caption,
            "text_features": rng.standard_normal((90, 24)).astype(np.float32),
            "image_features": rng.standard_normal((90, 20)).astype(np.float32)}
    for i in range(90):   # one image's features wherever it repeats, likewise a caption's
        data["image_features"][i] = data["image_features"][i % n_img]
        data["text_features"][i] = data["text_features"][i % 75]
    return runs, data


def test_full_depth_equals_brute_force_and_shallow_depth_never_helps(run):
    runs, data = run
    rows = levers.load_runs(runs, ["joint-x"])
    assert [r["name"] for r in rows] == ["joint-x"]
    out = levers.measure(runs, rows[0], data, depths=[1, 100], topks=[4])
    for fusion in ("hybrid", "zscore"):
        assert out["depth"][100][fusion] == pytest.approx(out["brute"][fusion])
    assert out["depth"][1]["hybrid"]["rsum"] <= out["brute"]["hybrid"]["rsum"]
    assert out["depth"][1]["hybrid"]["rsum"] < out["depth"][100]["hybrid"]["rsum"]
    assert max(out["topk"][4]["nnz"]) <= 4
    table = levers.tables([out])
    assert "| joint-x | 1 | brute force |" in table and "| joint-x | 1 | 4 |" in table
