"""``benchmarks/gpu_smoke.py`` in its CPU mode, run as CI runs it (its own process and Ray): every
path runs its CPU equivalent, only the GPU-only ones are skipped, stdout is one JSON line per
path plus the summary, and the exit status is 0 because nothing failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PATHS = ["featurize", "train", "train_2gpu", "eval", "index", "faiss_gpu", "serve"]


def test_cpu_mode_runs_every_path_but_the_gpu_only_ones(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--cpu", "--n", "48",
                           "--workdir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]  # stdout holds nothing but JSON lines
    *paths, summary = rows
    assert [r["path"] for r in paths] == PATHS, proc.stderr[-3000:]
    by_path = {r["path"]: r for r in paths}
    failed = {p: r.get("error") for p, r in by_path.items() if r["ok"] is False}
    assert not failed, (failed, proc.stderr[-3000:])
    for r in paths:
        assert {"path", "ok", "seconds", "throughput"} <= set(r) and r["device"] == "cpu", r
    assert {p for p, r in by_path.items() if r["ok"] == "skipped"} == {"train_2gpu", "faiss_gpu"}
    for p in ("featurize", "train", "eval", "index", "serve"):
        assert by_path[p]["ok"] is True and by_path[p]["throughput"] > 0, by_path[p]
    assert summary["summary"] is True and (summary["ok"], summary["failed"], summary["skipped"]) == (5, 0, 2)
    assert proc.returncode == 0
