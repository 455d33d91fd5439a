"""benchmarks/adaptive_fusion.py on small random heads: the fixed-weight rows agree with
sdray.evaluation, every choice is a grid point of its family, and the diagnostic bounds them."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
adaptive = pytest.importorskip("adaptive_fusion")
from hybrid_levers import load_runs  # noqa: E402

from tests.data_fixtures import repeated_feature_split, saved_sweep_run  # noqa: E402


def test_fixed_rows_agree_with_evaluation_and_choices_stay_in_their_family(tmp_path):
    from sdray import config as config_lib
    from sdray.evaluation import evaluate_features, head_tau, rsum

    runs = str(tmp_path / "runs.jsonl")
    saved_sweep_run(runs)
    rng = np.random.default_rng(0)
    val, test = repeated_feature_split(rng, 30, 40, 50), repeated_feature_split(rng, 60, 75, 90)
    row = load_runs(runs, ["joint-x"])[0]
    out = adaptive.measure(runs, row, val, test, [0.5], [0.0, 1.0], [0.0, 5.0], [None])
    cfg = config_lib.SdrayConfig()
    heads = adaptive.heads_of(runs, row, cfg)
    tau = head_tau(heads)
    ref = evaluate_features(heads, test, cfg, {
        "f": {"method": "calibrated", "w1": 1.0, "w2": 0.5, "tau": tau},
        "b": {"method": "calibrated", "w1": 1.0, "w2": 0.5, "tau": tau, "confidence_power": 1.0,
              "cosine_slope": 5.0}})
    assert out["dense"]["rsum"] == pytest.approx(rsum(ref, "dense"))
    assert out["dense"]["t2i_r1"] == pytest.approx(ref["t2i"]["dense"]["R@1"])
    assert out["fixed"]["rsum"] == pytest.approx(rsum(ref, "hybrid_f"))
    assert out["fixed"]["t2i_r1"] == pytest.approx(ref["t2i"]["hybrid_f"]["R@1"])
    assert (out["fixed"]["p"], out["fixed"]["b"]) == (0.0, 0.0)
    assert out["gap"]["b"] == 0.0 and out["level"]["p"] == 0.0
    if (out["both"]["p"], out["both"]["b"]) == (1.0, 5.0):
        assert out["both"]["rsum"] == pytest.approx(rsum(ref, "hybrid_b"))
    best = out["best-on-test (diag.)"]["t2i_r1"]
    assert all(out[k]["t2i_r1"] <= best for k in adaptive.LABELS)
    assert f"| joint-x | {row['seed']} | level |" in adaptive.table([out])
