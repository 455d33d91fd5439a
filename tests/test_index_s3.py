"""The index flow on a real S3 server (SeaweedFS on 127.0.0.1): build, publish, load, search,
republish, corrupted file named by its s3:// URI."""

from __future__ import annotations

import numpy as np
import pytest

from sdray import storage
from sdray.index import IndexConfig, IndexFileError, Retriever, ShardData, SparseIndexConfig, build_index, current_version
from sdray.index.synthetic import make_synthetic

pytestmark = pytest.mark.slow


def test_index_flow_on_s3(s3_server):
    syn = make_synthetic(1500, 20, dim=16, vocab=3000, seed=7)
    ids = [f"img{i}" for i in range(1500)]
    sides = {
        "images": ShardData(syn.dense, syn.sparse, ids, image_ids=ids),
        "captions": ShardData(syn.dense, syn.sparse, [f"c{i}" for i in range(1500)], image_ids=ids, captions=[f"cap {i}" for i in ids]),
    }
    out = s3_server.uri("indexes", "flow")
    cfg = IndexConfig(sparse=SparseIndexConfig(min_docs=500))
    v1 = build_index(out, sides, 2, cfg, vocabulary=[f"w{i}" for i in range(3000)])
    assert current_version(out) == v1
    r = Retriever.load(out)
    assert r.count("images") == r.count("captions") == 1500
    t2i = r.search(syn.q_dense, syn.q_sparse, k=5, mode="hybrid", side="images", explain=2)
    assert np.mean([q[0].id == f"img{t}" for q, t in zip(t2i, syn.targets)]) > 0.9
    i2t = r.search(syn.q_dense, syn.q_sparse, k=5, mode="dense", side="captions")
    assert i2t[0][0].caption.startswith("cap ")
    local = Retriever.load(out, shards=[0], sides=["captions"])
    assert local.count("captions") < 1500

    v2 = build_index(out, {"images": sides["images"]}, 1, cfg)
    assert current_version(out) == v2 != v1
    assert Retriever.load(out).sides == ["images"]

    bad = storage.join(out, v2, "shard-00000", "images", "meta.parquet")
    storage.write_bytes(bad, b"not parquet")
    with pytest.raises(IndexFileError, match="shard-00000/images/meta.parquet"):
        Retriever.load(out)
