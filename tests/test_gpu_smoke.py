"""``benchmarks/gpu_smoke.py`` in its CPU mode: every path runs its CPU equivalent, only the
GPU-only ones are skipped, the JSON lines have the promised shape and nothing fails."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_mode_runs_every_path_but_the_gpu_only_ones(ray_session, tmp_path):
    smoke_mod = _load()
    lines: list[str] = []
    smoke = smoke_mod.run_all(str(tmp_path), gpus=0, n=48, image_size=64, emit=lines.append)
    rows = [json.loads(line) for line in lines]
    by_path = {r["path"]: r for r in rows}
    assert list(by_path) == ["featurize", "train", "train_2gpu", "eval", "index", "faiss_gpu", "serve"]
    for r in rows:
        assert {"path", "ok", "seconds", "throughput"} <= set(r), r
        assert r["device"] == "cpu"
    failed = {r["path"]: r.get("error") for r in rows if r["ok"] is False}
    assert not failed, failed
    assert {p for p, r in by_path.items() if r["ok"] == "skipped"} == {"train_2gpu", "faiss_gpu"}
    for path in ("featurize", "train", "eval", "index", "serve"):
        assert by_path[path]["ok"] is True and by_path[path]["throughput"] > 0, by_path[path]
    summary = smoke.summary(1.0)
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (5, 0, 2)
