"""Pure-library tests of sdray.index (no Ray, no servers): synthetic vectors only."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sdray import storage
from sdray.index import (
    CSR,
    DenseIndex,
    DenseIndexConfig,
    ExactSparseIndex,
    IndexConfig,
    IndexFileError,
    Retriever,
    SeismicIndex,
    ShardData,
    SparseIndexConfig,
    build_index,
    current_version,
    to_csr,
)
from sdray.index import manifest as mf
from sdray.index.synthetic import make_synthetic

VOCAB = 2000


@pytest.fixture(scope="module")
def syn():
    return make_synthetic(3000, 40, dim=32, vocab=VOCAB, seed=1)


def _sides(syn, n=None):
    n = n or len(syn.dense)
    ids = [f"img{i}" for i in range(n)]
    images = ShardData(syn.dense[:n], syn.sparse.take(np.arange(n)), ids, image_ids=ids, uris=[f"s3://b/{i}.jpg" for i in ids])
    cap_ids = [f"cap{i}" for i in range(n)]
    captions = ShardData(
        syn.dense[:n][::-1].copy(), syn.sparse.take(np.arange(n)[::-1]), cap_ids, image_ids=ids[::-1], captions=[f"caption {i}" for i in range(n)]
    )
    return {"images": images, "captions": captions}


def _exact_cfg(**kw):
    return IndexConfig(sparse=SparseIndexConfig(kind="exact"), **kw)


def test_csr_roundtrip_and_topk():
    x = np.array([[0, 2.0, 0, 1.0], [0, 0, 0, 0], [3.0, 0, 0.5, 0]], np.float32)
    c = to_csr(x)
    assert c.n_rows == 3 and c.nnz == 4 and np.array_equal(c.to_dense(), x)
    assert np.array_equal(c.take([2, 0]).to_dense(), x[[2, 0]])
    p = to_csr(x, topk=1)
    assert np.array_equal(p.to_dense(), np.array([[0, 2, 0, 0], [0, 0, 0, 0], [3, 0, 0, 0]], np.float32))
    with pytest.raises(ValueError):
        CSR(np.array([0, 2]), np.array([1]), np.array([1.0]), 4)


def test_exact_sparse_matches_bruteforce(syn):
    ex = ExactSparseIndex(syn.sparse)
    s, i = ex.search(syn.q_sparse, 10)
    full = syn.q_sparse.to_dense() @ syn.sparse.to_dense().T
    for r in range(len(full)):
        want = np.lexsort((np.arange(full.shape[1]), -full[r]))[:10]
        want = want[full[r, want] > 0]
        assert list(i[r, : len(want)]) == list(want)
        np.testing.assert_allclose(s[r, : len(want)], full[r, want], rtol=1e-5)
        np.testing.assert_allclose(ex.score(syn.q_sparse.take([r]), want), full[r, want], rtol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_dense_kinds_roundtrip(syn, kind):
    cfg = DenseIndexConfig(kind=kind, nlist=16, nprobe=16, ef_search=64)
    d = DenseIndex.from_bytes(DenseIndex.build(syn.dense, cfg).to_bytes(), cfg)
    s, i = d.search(syn.q_dense, 10)
    exact = np.argsort(-(syn.q_dense @ syn.dense.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i, exact)])
    assert recall >= (1.0 if kind == "flat" else 0.8)
    np.testing.assert_allclose(d.vectors([3, 5]), syn.dense[[3, 5]])


def test_seismic_recall_vs_exact(tmp_path):
    syn = make_synthetic(5000, 100, dim=16, vocab=5000, seed=3)
    exact = ExactSparseIndex(syn.sparse).search(syn.q_sparse, 10)[1]
    idx = SeismicIndex.build(syn.sparse, SparseIndexConfig())
    path = str(tmp_path / "s.seismic")
    idx.save(path)
    idx = SeismicIndex.load(path, syn.sparse.dim, SparseIndexConfig())
    got = idx.search(syn.q_sparse, 10)[1]
    recall = np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (b >= 0).sum()) for a, b in zip(got, exact)])
    assert recall >= 0.95


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_n_shards_equal_one_shard_both_sides(tmp_path, syn, mode):
    sides = _sides(syn)
    build_index(str(tmp_path / "one"), sides, 1, _exact_cfg())
    build_index(str(tmp_path / "three"), sides, 3, _exact_cfg())
    one, three = Retriever.load(str(tmp_path / "one")), Retriever.load(str(tmp_path / "three"))
    assert three.count("images") == one.count("images") == 3000
    for side in ("images", "captions"):
        a = one.search(syn.q_dense, syn.q_sparse, k=10, mode=mode, side=side)
        b = three.search(syn.q_dense, syn.q_sparse, k=10, mode=mode, side=side)
        assert [[h.id for h in q] for q in a] == [[h.id for h in q] for q in b]
        np.testing.assert_allclose([[h.score for h in q] for q in a], [[h.score for h in q] for q in b], rtol=1e-6)


def test_hybrid_equals_bruteforce_fusion(tmp_path, syn):
    sides = _sides(syn)
    fusion = {"method": "calibrated", "w1": 0.5, "w2": 0.2, "tau": 0.05}
    build_index(str(tmp_path / "ix"), sides, 2, _exact_cfg(candidates=300), fusion=fusion)
    r = Retriever.load(str(tmp_path / "ix"))
    hits = r.search(syn.q_dense, syn.q_sparse, k=10, mode="hybrid", side="images")
    full = 0.5 * (syn.q_dense @ syn.dense.T) / 0.05 + 0.2 * (syn.q_sparse.to_dense() @ syn.sparse.to_dense().T)
    want = np.argsort(-full, axis=1)[:, :10]
    got = np.array([[int(h.id[3:]) for h in q] for q in hits])
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)]) >= 0.99
    assert hits[0][0].scores.keys() == {"dense", "sparse"}
    # text queries find their target image at rank 1 (queries are noisy copies of documents)
    assert np.mean(got[:, 0] == syn.targets) > 0.9


def test_subset_of_shards_and_explanations(tmp_path, syn):
    sides = _sides(syn)
    vocab = [f"t{i}" for i in range(VOCAB)]
    build_index(str(tmp_path / "ix"), sides, 3, _exact_cfg(), vocabulary=vocab)
    r = Retriever.load(str(tmp_path / "ix"), shards=[1], sides=["images"])
    assert r.sides == ["images"] and 0 < r.count("images") < 3000
    hits = r.search(syn.q_dense, syn.q_sparse, k=5, mode="sparse", side="images", explain=3)
    assert all(h.shard == 1 for q in hits for h in q)
    ex = hits[0][0].explanation
    assert ex and ex[0]["term"].startswith("t") and ex[0]["query"] > 0 and ex[0]["doc"] > 0
    with pytest.raises(ValueError, match="captions"):
        r.search(syn.q_dense, syn.q_sparse, side="captions")


def test_seismic_shards_through_retriever(tmp_path):
    syn = make_synthetic(4000, 50, dim=16, vocab=5000, seed=5)
    sides = {"images": ShardData(syn.dense, syn.sparse, [str(i) for i in range(4000)])}
    build_index(str(tmp_path / "ix"), sides, 2, IndexConfig(sparse=SparseIndexConfig(min_docs=100)))
    r = Retriever.load(str(tmp_path / "ix"))
    assert not any(s.exact_sparse for s in r.shards["images"])
    got = r.search(sparse=syn.q_sparse, k=10, mode="sparse")
    want = ExactSparseIndex(syn.sparse).search(syn.q_sparse, 10)
    recall = np.mean([len({int(h.id) for h in q} & set(w[w >= 0])) / max(1, (w >= 0).sum()) for q, w in zip(got, want[1])])
    assert recall >= 0.95
    # returned scores are exact, not Seismic's quantised ones
    exact = ExactSparseIndex(syn.sparse)
    h = got[0][0]
    assert h.score == pytest.approx(float(exact.score(syn.q_sparse.take([0]), [int(h.id)])[0]), rel=1e-6)


def test_atomic_publish_interrupted_build_resumes(tmp_path, syn):
    out = str(tmp_path / "ix")
    sides = _sides(syn, 600)
    v1 = build_index(out, sides, 2, _exact_cfg())
    before = Retriever.load(out).search(syn.q_dense, syn.q_sparse, k=5, mode="dense")

    new_sides = _sides(syn)  # a different corpus -> a new version

    class Boom(RuntimeError):
        pass

    def die_after_first(s):
        if s == 0:
            raise Boom()

    with pytest.raises(Boom):
        build_index(out, new_sides, 3, _exact_cfg(), on_shard=die_after_first)
    assert current_version(out) == v1  # readers still see the old index
    after = Retriever.load(out).search(syn.q_dense, syn.q_sparse, k=5, mode="dense")
    assert [[h.id for h in q] for q in before] == [[h.id for h in q] for q in after]
    pending = storage.read_json(os.path.join(out, mf.BUILDING))["version"]
    assert pending != v1 and os.path.exists(os.path.join(out, pending, "shard-00000", "images", "shard.json"))

    built = []
    v2 = build_index(out, new_sides, 3, _exact_cfg(), on_shard=built.append)
    assert v2 == pending and current_version(out) == v2
    assert Retriever.load(out).count("images") == 3000
    assert not os.path.exists(os.path.join(out, mf.BUILDING))
    assert Retriever.load(out, version=v1).count("images") == 600  # old version still readable


def test_missing_and_corrupted_files_are_named(tmp_path, syn):
    out = str(tmp_path / "ix")
    v = build_index(out, _sides(syn, 500), 2, _exact_cfg())
    target = os.path.join(out, v, "shard-00001", "images", "sparse.values.npy")
    data = open(target, "rb").read()
    with open(target, "wb") as f:
        f.write(data[:-8] + b"\x00" * 8)
    with pytest.raises(IndexFileError, match="shard-00001/images/sparse.values.npy"):
        Retriever.load(out)
    Retriever.load(out, shards=[0])  # other shards still load
    os.remove(target)
    with pytest.raises(IndexFileError, match="shard-00001/images/sparse.values.npy.*missing"):
        Retriever.load(out)
    faiss_file = os.path.join(out, v, "shard-00000", "captions", "dense.faiss")
    with open(faiss_file, "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(IndexFileError, match="shard-00000/captions/dense.faiss"):
        Retriever.load(out, shards=[0], verify=False)
    man = os.path.join(out, v, "manifest.json")
    m = json.load(open(man))
    m["sides"]["images"]["count"] += 1
    json.dump(m, open(man, "w"))
    with pytest.raises(IndexFileError, match="manifest.json"):
        Retriever.load(out)
