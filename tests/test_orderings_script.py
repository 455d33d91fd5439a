"""benchmarks/orderings.py --demo-json: the tables and verdicts of a saved demo output."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
orderings = pytest.importorskip("orderings")


def _result(dense: float, sparse: float, hybrid: float, nnz: float) -> dict:
    rec = lambda r: {f"R@{k}": r for k in (1, 5, 10)}  # noqa: E731
    return {d: {"dense": rec(dense), "sparse": rec(sparse), "hybrid": rec(hybrid)} for d in ("t2i", "i2t")} | {
        "sparsity": {"text_nnz": nnz, "image_nnz": nnz}}


@pytest.mark.parametrize("joint_hybrid,rc", [(0.6, 0), (0.5, 1)])
def test_demo_json_verdicts(tmp_path, capsys, joint_hybrid, rc):
    demo = {"methods": {"dense": _result(0.5, 0.1, 0.1, 9000), "d2s": _result(0.5, 0.4, 0.5, 30),
                        "joint": _result(0.55, 0.5, joint_hybrid, 200)},
            "timings": {"train_joint": 1.0}, "total_seconds": 2.0}
    path = tmp_path / "demo.json"
    path.write_text("progress line\n" + json.dumps(demo) + "\n")
    assert orderings.main(["--demo-json", str(path)]) == rc
    out = capsys.readouterr().out
    assert "| joint | 330.0 | 300.0 |" in out          # 100 x 6 recalls of 0.55 and 0.5
    assert ("| joint hybrid >= joint dense | 360.0 | 330.0 | yes |" in out) == (rc == 0)
