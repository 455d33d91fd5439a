"""benchmarks/hybrid_levers.py on small random heads: through an index whose candidates cover the
split, the hybrid equals brute force (both fusions); fewer candidates never help the
per-document fusion; top-k pruning caps nnz."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
levers = pytest.importorskip("hybrid_levers")

from tests.data_fixtures import repeated_feature_split, saved_sweep_run  # noqa: E402


@pytest.fixture
def run(tmp_path):
    runs = str(tmp_path / "runs.jsonl")
    saved_sweep_run(runs, names=("other", "joint-x"))
    # 30 images with two captions, 15 captions on two images
    return runs, repeated_feature_split(np.random.default_rng(0), 60, 75, 90)


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


def test_the_saved_runs_parser_and_loader_refuse_a_setting_without_runs(tmp_path, capsys):
    import torch

    runs = str(tmp_path / "runs.jsonl")
    saved_sweep_run(runs)
    args = levers.saved_runs_parser("x").parse_args(
        ["--features", str(tmp_path), "--runs", runs, "--only", "nope", "--threads", "1"])
    assert (args.split, args.threads, args.only) == ("test", 1, ["nope"])
    threads = torch.get_num_threads()
    try:
        assert levers.load_saved_runs(args, "val", "eval") is None
    finally:
        torch.set_num_threads(threads)
    assert "no runs of ['nope']" in capsys.readouterr().err
