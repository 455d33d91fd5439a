"""Dense index: ``auto`` kind by shard size, and the faiss GPU plumbing (``to_gpu``, IVF trained
on the GPU) exercised against a stand-in GPU API on this CPU-only machine."""

from __future__ import annotations

import numpy as np
import pytest

import faiss

from sdray.index import dense as dense_mod
from sdray.index.config import DenseIndexConfig
from sdray.index.dense import DenseIndex, gpu_available, resolve_kind, to_gpu


def _vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_auto_builds_flat_below_the_threshold_and_ivf_from_it():
    cfg = DenseIndexConfig(ivf_min_docs=400, nlist=8)
    assert resolve_kind(cfg, 399) == "flat" and resolve_kind(cfg, 400) == "ivf"
    assert DenseIndex.build(_vectors(399), cfg).kind == "flat"
    big = DenseIndex.build(_vectors(400), cfg)
    assert big.kind == "ivf"
    assert DenseIndexConfig().kind == "auto"
    assert resolve_kind(DenseIndexConfig(kind="hnsw"), 10) == "hnsw"


def test_to_gpu_is_the_identity_without_a_gpu():
    if gpu_available():
        pytest.skip("a GPU is visible")
    idx = DenseIndex.build(_vectors(50), DenseIndexConfig(kind="flat"))
    assert to_gpu(idx) is idx and not idx.on_gpu
    assert to_gpu(idx.index) is idx.index


class _FakeGpuApi:
    """faiss's GPU entry points on the CPU: ``index_cpu_to_gpu`` clones the index (and records
    it), ``index_gpu_to_cpu`` clones it back. Enough to check which index trains and searches."""

    def __init__(self):
        self.to_gpu, self.to_cpu = [], []

    def install(self, monkeypatch):
        monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", self._cpu_to_gpu, raising=False)
        monkeypatch.setattr(faiss, "index_gpu_to_cpu", self._gpu_to_cpu, raising=False)
        monkeypatch.setattr(dense_mod, "_GPU_RESOURCES", [])

    def _cpu_to_gpu(self, res, device, index):
        clone = faiss.clone_index(index)
        self.to_gpu.append((device, clone))
        return clone

    def _gpu_to_cpu(self, index):
        self.to_cpu.append(index)
        return faiss.clone_index(index)


def test_ivf_is_trained_on_the_gpu_and_saved_as_a_cpu_index(monkeypatch):
    api = _FakeGpuApi()
    api.install(monkeypatch)
    x = _vectors(800)
    idx = DenseIndex.build(x, DenseIndexConfig(kind="ivf", nlist=8, nprobe=8))
    assert len(api.to_gpu) == 1 and len(api.to_cpu) == 1
    gpu_copy = api.to_gpu[0][1]
    assert gpu_copy.is_trained and gpu_copy.ntotal == 800  # trained and filled "on the GPU"
    assert idx.index is not gpu_copy and idx.index.ntotal == 800 and not idx.on_gpu
    np.testing.assert_allclose(idx.vectors([3, 7]), x[[3, 7]], atol=1e-6)
    # flat: nothing to train, built on the CPU
    DenseIndex.build(x, DenseIndexConfig(kind="flat"))
    assert len(api.to_gpu) == 1
    # and with gpu=False the GPU is left alone
    DenseIndex.build(x, DenseIndexConfig(kind="ivf", nlist=8, gpu=False))
    assert len(api.to_gpu) == 1


def test_to_gpu_searches_the_gpu_copy_and_reads_vectors_from_the_cpu_one(monkeypatch):
    x = _vectors(800)
    idx = DenseIndex.build(x, DenseIndexConfig(kind="ivf", nlist=8, nprobe=8, gpu=False))
    expected = idx.search(x[:5], 4)
    api = _FakeGpuApi()
    api.install(monkeypatch)
    on_gpu = to_gpu(idx)
    assert on_gpu.on_gpu and on_gpu.index is idx.index and on_gpu.kind == "ivf"
    gpu_index = api.to_gpu[0][1]
    assert faiss.extract_index_ivf(gpu_index).nprobe == 8
    searched = []
    real_search = gpu_index.search
    monkeypatch.setattr(gpu_index, "search", lambda q, k: searched.append(len(q)) or real_search(q, k))
    got = on_gpu.search(x[:5], 4)
    assert searched == [5]
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(on_gpu.vectors([1]), x[[1]], atol=1e-6)
    hnsw = DenseIndex.build(x[:100], DenseIndexConfig(kind="hnsw"))
    assert to_gpu(hnsw) is hnsw  # no GPU HNSW in faiss
