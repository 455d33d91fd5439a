"""``sdray demo``: the stage bookkeeping (fast, no Ray) and a reduced-size end-to-end run (slow).

The end-to-end test runs the installed ``sdray`` console script — the README's first command —
at ``--size small`` in a fresh work folder, checks the ``--json`` contract (DESIGN.md §4), the
report and its plots, then runs it again on the same folder and checks that every finished stage
was reused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import demo

METRICS = ("R@1", "R@5", "R@10", "MRR@10")
STAGES = ("synth", "featurize", "train_dense", "train_d2s", "train_joint", "eval", "index")


# ----------------------------------------------------------------------------- fast

def test_stages_reuse_and_invalidate(tmp_path):
    calls = []

    def make(name):
        def fn():
            calls.append(name)
            os.makedirs(tmp_path / name, exist_ok=True)
            return {"name": name}
        return fn

    st = demo.Stages(str(tmp_path))
    st.n_total = 2
    assert st.run("a", "fp1", [str(tmp_path / "a")], make("a")) == {"name": "a"}
    assert st.run("b", "fp2", [str(tmp_path / "b")], make("b")) == {"name": "b"}
    assert calls == ["a", "b"] and st.ran == ["a", "b"]

    st2 = demo.Stages(str(tmp_path))           # same fingerprints: both reused, results kept
    st2.n_total = 2
    assert st2.run("a", "fp1", [str(tmp_path / "a")], make("a")) == {"name": "a"}
    (tmp_path / "b" / "stale").write_text("x")
    assert st2.run("b", "fp2-changed", [str(tmp_path / "b")], make("b")) == {"name": "b"}
    assert st2.reused == ["a"] and st2.ran == ["b"] and calls == ["a", "b", "b"]
    assert not (tmp_path / "b" / "stale").exists(), "a redone stage starts from a clean output"
    assert set(st2.timings) == {"a", "b"}

    shutil.rmtree(tmp_path / "a")              # output gone: redone even if the fingerprint matches
    st3 = demo.Stages(str(tmp_path))
    st3.run("a", "fp1", [str(tmp_path / "a")], make("a"))
    assert st3.ran == ["a"]
    assert demo.Stages(str(tmp_path), fresh=True).state == {"stages": {}}


def test_independent_stages_run_side_by_side_on_shares_of_the_cpus(tmp_path):
    import threading

    barrier = threading.Barrier(2, timeout=10)   # each stage waits for the other: only side by side passes
    got = {}

    def make(name, wait=True):
        def fn(cpus):
            got[name] = cpus
            if wait:
                barrier.wait()
            os.makedirs(tmp_path / name, exist_ok=True)
            return {"name": name}
        return fn

    stages = [(n, "fp", [str(tmp_path / n)], make(n)) for n in ("b", "c")]
    st = demo.Stages(str(tmp_path))
    st.n_total = 2
    assert st.run_together(stages, cpus=4) == [{"name": "b"}, {"name": "c"}]
    assert got == {"b": 2, "c": 2} and st.ran == ["b", "c"] and st.together == [["b", "c"]]

    # one reused, the other redone alone on every CPU (no barrier partner: it must not wait)
    shutil.rmtree(tmp_path / "c")
    got.clear()
    st2 = demo.Stages(str(tmp_path))
    st2.n_total = 2
    stages2 = [stages[0], ("c", "fp", [str(tmp_path / "c")], make("c", wait=False))]
    assert st2.run_together(stages2, cpus=4) == [{"name": "b"}, {"name": "c"}]
    assert got == {"c": 4} and st2.reused == ["b"] and st2.ran == ["c"] and st2.together == []


def test_timings_table_counts_side_by_side_stages_once():
    from sdray.report import timings_table

    table = timings_table({"a": 10.0, "b": 30.0, "c": 20.0}, together=[["b", "c"]])
    assert table.splitlines()[-1].split()[:2] == ["total", "40.0"]
    assert "side by side with c" in table and "side by side with b" in table
    assert timings_table({"a": 10.0, "b": 30.0}).splitlines()[-1].split()[1] == "40.0"


def test_demo_flags_and_sizes():
    import argparse

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    args = p.parse_args(["--workdir", "w", "--json", "--size", "small", "--epochs", "3"])
    s = demo.settings(args)
    assert s["epochs"] == 3 and s["n"] == demo.SIZES["small"]["n"]
    assert args.json and args.workdir == "w"
    full = demo.settings(p.parse_args([]))
    assert full == {**demo.SIZES["full"], "seed": 0, "data_image_size": 128, "cpus": full["cpus"]}
    from pipelines.cli import SUBCOMMANDS

    assert SUBCOMMANDS["demo"][0] == "pipelines.demo"


def test_report_writer(tmp_path):
    from sdray.report import comparison_table, write_report

    def result(x):
        reps = {r: {m: x for m in METRICS} for r in ("dense", "sparse", "hybrid")}
        return {"t2i": reps, "i2t": reps, "sparsity": {"text_nnz": 10.0, "image_nnz": 20.0,
                                                       "flops": 1.5}, "n_texts": 4, "n_images": 2}

    methods = {m: result(0.1 * (i + 1)) for i, m in enumerate(demo.METHODS)}
    methods["d2s"]["fusion"] = {"method": "calibrated", "w1": 1.0, "w2": 0.2}
    methods["joint"]["fusion"] = {"method": "calibrated", "w1": 1.0, "w2": 0.1}
    hist = {"dense": [{"type": "train", "step": 1, "loss": 2.0},
                      {"type": "val", "epoch": 1, "step": 1, "rsum_dense": 1.0}],
            "joint": [{"type": "train", "step": 1, "loss": 3.0},
                      {"type": "val", "epoch": 1, "step": 1, "rsum_sparse": 2.0, "text_nnz": 5,
                       "image_nnz": 9}]}
    table = comparison_table(methods)
    assert table.count("\n") >= 9 and "joint" in table and "30.00" in table
    q = {"kind": "text", "query": "a red circle", "mode": "hybrid", "took_ms": 3.0, "first_relevant": 1,
         "hits": [{"id": "x", "caption": "a red circle", "score": 1.0, "relevant": True,
                   "scores": {"dense": 0.5, "sparse": 3.0},
                   "explanation": [{"term": "red", "query": 1.0, "doc": 2.0}]}]}
    path = write_report(str(tmp_path), methods, hist, {"synth": 1.0, "train_dense": 2.0},
                        reused=["synth"], queries=[q])
    text = Path(path).read_text()
    for needle in ("recall_per_method.png", "recall_vs_sparsity.png", "training_curves.png",
                   "| joint | sparse |", "red (1.00×2.00)", "reused",
                   "d2s: method calibrated, w1 1, w2 0.2; joint: method calibrated, w1 1, w2 0.1."):
        assert needle in text, needle
    for name in ("recall_per_method.png", "recall_vs_sparsity.png", "training_curves.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000


# ----------------------------------------------------------------------------- end to end

def _sdray() -> list[str]:
    exe = Path(sys.executable).parent / "sdray"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pipelines.cli"]


def _run_demo(workdir: Path, *extra: str, timeout: float = 1500) -> tuple[dict, str, str]:
    # a clean environment for the embedded defaults: no cluster address, no S3 settings that a
    # session fixture may have exported
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run([*_sdray(), "demo", "--size", "small", "--workdir", str(workdir),
                           "--json", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last), proc.stdout, proc.stderr


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    work = tmp_path / "demo"
    out, stdout, stderr = _run_demo(work)

    # --json: one eval object per method, the DESIGN §4 shape, fractions in [0, 1]
    assert set(out["methods"]) == {"dense", "d2s", "joint"}
    for method, res in out["methods"].items():
        for d in ("t2i", "i2t"):
            for rep in ("dense", "sparse", "hybrid"):
                for k in METRICS:
                    assert 0.0 <= res[d][rep][k] <= 1.0, (method, d, rep, k)
        assert set(res["sparsity"]) >= {"text_nnz", "image_nnz", "flops"}
        assert res["n_texts"] > 0 and res["n_images"] > 0
    # dense-only training leaves no sparse signal to speak of; the sparse methods do have one
    assert out["methods"]["joint"]["t2i"]["sparse"]["R@10"] > 0
    for stage in (*STAGES, "serve"):
        assert out["timings"][stage] >= 0, stage
    assert out["ran"] == [*STAGES, "serve"] and out["reused"] == []
    assert out["together"] == [["train_d2s", "train_joint"]]
    # the local Ray has no dashboard: Ray Train's once-a-second state-API warning is silenced
    assert "[sdray train joint]" in stderr
    assert "Failed to query Ray Train Controller" not in stderr

    # the table on stdout, the report and its plots
    assert "method" in stdout and "hybrid" in stdout and "MRR@10" in stdout
    report = Path(out["report"])
    assert report.is_file() and report.parent == work
    text = report.read_text()
    for name in ("recall_per_method.png", "recall_vs_sparsity.png", "training_curves.png"):
        assert (work / "plots" / name).stat().st_size > 1000
        assert f"plots/{name}" in text
    assert "| d2s | sparse |" in text

    # each model folder is Hub-style: a model card with val (from training) and test metrics
    from sdray.model_card import parse_front_matter

    card = parse_front_matter((work / "models" / "joint" / "README.md").read_text())
    assert card["library_name"] == "sdray" and card["method"] == "joint"
    assert card["metrics"]["test"]["t2i"]["sparse"] == {
        k: round(v, 4) for k, v in out["methods"]["joint"]["t2i"]["sparse"].items()}
    assert set(card["metrics"]["val"]) == {"t2i", "i2t"} and card["sparsity"]["test"]["text_nnz"] > 0

    # sample queries through the served endpoint, with explanations
    assert len(out["queries"]) == 4
    assert {q["kind"] for q in out["queries"]} == {"text", "image"}
    for q in out["queries"]:
        assert q["hits"], q["query"]
        for h in q["hits"]:
            assert {"dense", "sparse"} <= set(h["scores"])
            assert isinstance(h["explanation"], list)
    assert any(h["explanation"] for q in out["queries"] for h in q["hits"])

    # the index was built from the test features; its images still point into the raw shards
    from sdray.index import Retriever

    r = Retriever.load(str(work / "index"))
    try:
        metas = [shard.meta for shard in r.shards["images"]]
    finally:
        r.close()
    raw = {str(p) for p in (work / "data" / "test").iterdir()}
    uris = [u for m in metas for u in m["uri"]]
    assert uris and all(u and u.split("#")[0] in raw for u in uris)
    assert all(loc for m in metas for loc in m["image_loc"])

    # same workdir again: every finished stage is reused, nothing recomputed
    again, _, _ = _run_demo(work, "--no-serve")
    assert again["reused"] == list(STAGES) and again["ran"] == []
    assert again["methods"] == out["methods"]
    assert again["timings"]["train_joint"] == pytest.approx(out["timings"]["train_joint"], abs=0.01)
    assert again["total_seconds"] < out["total_seconds"]
