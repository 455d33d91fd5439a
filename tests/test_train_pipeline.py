"""``sdray train`` / ``sdray eval`` end to end on a shared local Ray (few TorchTrainer runs).

1. dense, feature shards, 2 workers, checkpoints to S3 every 3 steps; the first run is killed
   mid-way (injected worker crash, no retries) and fails; the same command again resumes from
   its last checkpoint and finishes: model, metrics.jsonl, plots, summary on S3.
2. joint in raw mode (image–text shards, frozen backbone inside the workers) from the dense
   model (``--init``), 2 workers, a worker crash mid-run with retries allowed: Ray Train restarts
   the workers from the last checkpoint and the run finishes.
``sdray eval`` on feature shards (table and ``--json``) and on raw shards. (d2s runs the same
pipeline; its step is covered by tests/test_training.py.)
3. Reproducibility: the worker's data order is a function of the seed, and two one-worker runs
   of the same config give identical training and validation rows.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main as cli

pytestmark = pytest.mark.slow

HT, HI, VOCAB = 32, 48, 100  # the tiny CLIP of sdray.backbones.save_tiny


def write_feature_split(out, n, seed, n_files=2, groups=None):
    """Random feature shards with structure (pairs share a class centroid), tiny-CLIP sizes."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    groups = groups or n // 2
    ct = np.random.default_rng(99).normal(size=(groups, HT)).astype(np.float32)
    ci = np.random.default_rng(98).normal(size=(groups, HI)).astype(np.float32)
    g = rng.integers(0, groups, n)
    tf = ct[g] + 0.3 * rng.normal(size=(n, HT)).astype(np.float32)
    imf = ci[g] + 0.3 * rng.normal(size=(n, HI)).astype(np.float32)
    ids = [rng.integers(5, VOCAB, rng.integers(3, 8)).astype(np.int32) for _ in range(n)]
    for f in range(n_files):
        lo, hi = f * n // n_files, (f + 1) * n // n_files
        off = np.concatenate([[0], np.cumsum([len(x) for x in ids[lo:hi]])]).astype(np.int32)
        pq.write_table(pa.table({
            "sample_id": [f"s{seed}_{i}" for i in range(lo, hi)],
            # every 8th image has a second caption (multi-positive)
            "image_id": [f"img{seed}_{i - (i % 8 == 1)}" for i in range(lo, hi)],
            "caption": [f"caption {seed} {i}" for i in range(lo, hi)],
            "input_ids": pa.ListArray.from_arrays(pa.array(off), pa.array(np.concatenate(ids[lo:hi]), pa.int32())),
            "text_features": pa.FixedSizeListArray.from_arrays(pa.array(tf[lo:hi].ravel()), HT),
            "image_features": pa.FixedSizeListArray.from_arrays(pa.array(imf[lo:hi].ravel()), HI),
        }), os.path.join(out, f"part-{f:03d}.parquet"))
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump({"text_dim": HT, "image_dim": HI, "rows": n}, fh)
    return out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from sdray.backbones import save_tiny

    root = tmp_path_factory.mktemp("train-data")
    save_tiny("clip", str(root / "tinyclip"))
    write_feature_split(str(root / "feat" / "train"), 256, seed=0)
    write_feature_split(str(root / "feat" / "val"), 64, seed=1, n_files=1)
    assert cli(["synth", "--out", str(root / "raw"), "--n", "96", "--n-val", "24", "--n-test", "24",
                "--image-size", "32", "--shard-size", "48"]) == 0
    return root


def _common(root, out, method, epochs, **extra):
    args = ["train", "--train", str(root / "feat" / "train"), "--val", str(root / "feat" / "val"),
            "--out", out, "--method", method, "--backbone", "clip", "--backbone-path",
            str(root / "tinyclip"), "--set", "heads.dense_dim=24", "--epochs", str(epochs),
            "--batch-size", "32", "--lr", "1e-2", "--log-every", "4"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_dense_on_s3_killed_then_resumed(ray_session, s3_server, tiny_data, tmp_path, capsys):
    from sdray import storage

    out = s3_server.uri("train-test/dense")
    # streamed by Ray Data (the tiny split is under data.direct_read_max_bytes, read directly elsewhere)
    args = _common(tiny_data, out, "dense", 2, num_workers=2, checkpoint_every=3) + [
        "--set", "data.direct_read_max_bytes=0"]
    # run 1: a worker dies at step 5 and no retry is allowed -> the run fails
    from pipelines.cli import EXIT_TRAINING

    assert cli(args + ["--max-failures", "0", "--inject-failure-step", "5",
                       "--failure-marker", str(tmp_path / "fail1")]) == EXIT_TRAINING
    assert "sdray train: training failed:" in capsys.readouterr().err
    assert storage.list_files(storage.join(out, "run"), (".safetensors",)), "no checkpoint on S3"
    # run 2: the same command resumes from the last checkpoint and finishes
    assert cli(args + ["--json"]) == 0
    printed = capsys.readouterr().out
    assert "reads the split itself" not in printed
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["resumed_from"] and summary["resumed_from"][0] >= 3
    assert summary["steps"] == 16 and summary["epochs_run"] == 2
    for name in ("heads.safetensors", "config.yaml", "model.json", "metrics.jsonl", "summary.json", "README.md",
                 "plots/loss.png", "plots/recall.png", "plots/nnz.png", "best/heads.safetensors"):
        assert storage.exists(storage.join(out, name)), name
    rows = [json.loads(line) for line in storage.read_bytes(storage.join(out, "metrics.jsonl")).decode().splitlines()]
    val = [r for r in rows if r["type"] == "val"]
    assert [r["epoch"] for r in val] == [1, 2]
    assert {"rsum_dense", "rsum_sparse", "rsum_hybrid", "text_nnz", "image_nnz", "flops"} <= set(val[0])
    # the trained dense model beats chance (64 val pairs: R@10 by chance ~0.16)
    assert summary["val"]["t2i"]["dense"]["R@10"] > 0.3

    # sdray eval on S3 model + local feature shards: table, then the §4 JSON object
    assert cli(["eval", "--model", out, "--data", str(tiny_data / "feat" / "val"), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("t2i") and "dense" in line for line in lines)
    res = json.loads(lines[-1])
    assert set(res) >= {"t2i", "i2t", "sparsity", "n_texts", "n_images"}
    assert set(res["t2i"]) >= {"dense", "sparse", "hybrid"}
    assert set(res["t2i"]["dense"]) == {"R@1", "R@5", "R@10", "MRR@10"}
    assert res["n_texts"] == 64 and res["n_images"] == 56
    assert res["t2i"]["dense"] == pytest.approx(summary["val"]["t2i"]["dense"])
    pytest.dense_model = out  # for the next test


def test_joint_raw_mode_from_dense_survives_worker_crash(ray_session, tiny_data, tmp_path, capsys):
    """Raw image-text shards (frozen backbone in the workers), 2 workers, --init from the dense
    model, a worker killed at step 6 with retries allowed: the run restarts from its checkpoint."""
    init = getattr(pytest, "dense_model", None)
    if init is None:
        pytest.skip("needs the dense model of the previous test")
    out = str(tmp_path / "joint")
    raw = tiny_data / "raw"
    args = ["train", "--train", str(raw / "train"), "--val", str(raw / "val"), "--out", out,
            "--method", "joint", "--init", init, "--backbone", "clip", "--backbone-path",
            str(tiny_data / "tinyclip"), "--set", "heads.dense_dim=24", "--set", "backbone.image_size=32",
            "--set", "selection.max_nnz=1000", "--set", "loss.expansion_control=true",
            "--epochs", "2", "--batch-size", "16", "--lr", "1e-2", "--num-workers", "2",
            "--checkpoint-every", "4", "--inject-failure-step", "6",
            "--failure-marker", str(tmp_path / "fail2"), "--max-failures", "2", "--json"]
    assert cli(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert os.path.exists(tmp_path / "fail2"), "the failure was not injected"
    assert summary["resumed_from"], "the workers were not restarted from a checkpoint"
    assert summary["steps"] == 2 * (96 // 16)
    assert summary["val"]["n_images"] == 24
    from sdray.model import RetrievalModel

    m = RetrievalModel.load(out)
    assert m.meta["method"] == "joint"
    assert os.path.exists(os.path.join(out, "plots", "recall.png"))
    # eval on raw shards encodes with the backbone in-process and agrees with the validation
    assert cli(["eval", "--model", out, "--data", str(raw / "val"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_texts"] == summary["val"]["n_texts"]
    assert res["t2i"]["sparse"] == pytest.approx(summary["val"]["t2i"]["sparse"])
    assert res["t2i"]["hybrid"] == pytest.approx(summary["val"]["t2i"]["hybrid"])


def _order(uri, seed, epoch, shuffle_buffer=16):
    """image ids of one epoch through the worker path: _dataset -> ingest_config -> epoch_batches."""
    from pipelines.train import _dataset, epoch_batches, ingest_config
    from sdray.config import SdrayConfig

    ds = _dataset(uri, "features", SdrayConfig(), seed)
    shard = ingest_config().configure({"train": ds}, world_size=1, worker_handles=None,
                                      worker_node_ids=None)[0]["train"]
    return [str(x) for b in epoch_batches(shard, 8, shuffle_buffer, seed, epoch) for x in b["image_id"]]


def test_data_order_is_a_function_of_the_seed(ray_session, tmp_path):
    """Same seed, same order (block order and shuffle buffer); another seed, another order."""
    uri = write_feature_split(str(tmp_path / "feat"), 96, seed=4, n_files=6)
    first = _order(uri, seed=3, epoch=0)
    assert len(first) == 96 and len(set(first)) > 80
    assert _order(uri, seed=3, epoch=0) == first
    other = _order(uri, seed=4, epoch=0)
    assert other != first and sorted(other) == sorted(first)


def test_two_runs_of_one_config_give_identical_metrics(ray_session, tiny_data, tmp_path, capsys):
    """Two ``sdray train`` runs (joint with expansion control, 1 worker, shuffled data, fresh
    seeded sparse head) of the same config on the same data: identical validation rows, even
    when the second run's worker dies in the second epoch and the run resumes from a mid-epoch
    checkpoint. The split is small, so the worker reads it itself (data.direct_read_max_bytes)."""
    runs = []
    for k in range(2):
        out = str(tmp_path / f"run{k}")
        args = _common(tiny_data, out, "joint", 2, checkpoint_every=4) + [
            "--set", "loss.expansion_control=true", "--set", "optim.seed=7",
            "--set", "selection.max_nnz=1000", "--json"]
        if k == 1:  # 8 steps per epoch: dies after the step-12 checkpoint, resumes at batch 4
            args += ["--inject-failure-step", "11", "--failure-marker", str(tmp_path / "fail"),
                     "--max-failures", "1"]
        assert cli(args) == 0
        printed = capsys.readouterr().out
        assert "each worker reads the split itself" in printed
        if k == 1:
            assert os.path.exists(tmp_path / "fail"), "the failure was not injected"
            assert json.loads(printed.strip().splitlines()[-1])["resumed_from"] == [12]
        rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
        runs.append([{k: v for k, v in r.items() if k not in ("pairs_per_s",)}
                     for r in rows if r["type"] in ("val", "train")])
    val = [[r for r in run if r["type"] == "val"] for run in runs]
    assert len(val[0]) == 2
    assert val[0] == val[1]
    train = [[r["loss"] for r in run if r["type"] == "train"] for run in runs]
    assert train[0] == train[1] and len(train[0]) >= 2


def test_workers_holding_every_cpu_fail_fast_instead_of_hanging(ray_session, tiny_data, tmp_path, capsys):
    """With every CPU held by training workers, Ray Data's read tasks never start: the job must
    refuse with a config error (exit 3) before it starts a trainer, not hang. (A split small
    enough for the workers' direct reads needs no Ray Data, so streaming is forced here.)"""
    total = int(ray_session.cluster_resources()["CPU"])
    rc = cli(_common(tiny_data, str(tmp_path / "m"), "dense", 1, cpus_per_worker=total,
                     set="data.direct_read_max_bytes=0"))
    assert rc == 3
    assert "no CPU is left for Ray Data" in capsys.readouterr().err


def test_local_ray_keeps_a_cpu_for_data_reads():
    from pipelines.train import local_ray_cpus

    assert local_ray_cpus(1, 2.0) >= 3
    assert local_ray_cpus(2, 1.5) >= 4
    assert local_ray_cpus(1, 1.0) >= max(2, os.cpu_count() or 1)
