"""Sample ids are unique across the whole input: the shard's path under the root plus the key,
so sub-folders that reuse shard names (``train/shard-00000.tar``, ``val/shard-00000.tar``) do
not collide in featurize, train/eval readers or index."""

from __future__ import annotations

import io

import pytest

from pipelines.datasets import list_shards, shard_ids, split_sample_id
from sdray import storage
from sdray.data import SkipCounts, iter_shard_samples
from sdray.data.formats import shard_id
from tests import data_fixtures as F


def test_shard_ids_are_relative_paths(tmp_path):
    root = str(tmp_path / "data")
    for rel in ("train/shard-00000.tar", "val/shard-00000.tar", "00000.tar", "00000.parquet",
                "pq/part-0.parquet"):
        storage.write_bytes(storage.join(root, rel), F.img2dataset_tar(1))
    shards = list_shards(root)
    # 00000.parquet beside 00000.tar is img2dataset's metadata sidecar, not a shard
    assert [s[len(root) + 1:] for s in shards] == ["00000.tar", "pq/part-0.parquet",
                                                   "train/shard-00000.tar", "val/shard-00000.tar"]
    ids = shard_ids(shards, root)
    assert sorted(ids.values()) == ["00000", "pq/part-0", "train/shard-00000", "val/shard-00000"]
    assert shard_id("s3://b/x/train/a.tar", "s3://b/x/") == "train/a"
    assert shard_id("s3://b/x/a.tar", "s3://b/x/a.tar") == "a"      # the root is the shard
    rows = list(iter_shard_samples(io.BytesIO(F.img2dataset_tar(2)), "x.tar", SkipCounts(),
                                   shard="val/shard-00000"))
    assert [r["sample_id"] for r in rows] == ["val/shard-00000/000000000",
                                              "val/shard-00000/000000001"]
    assert split_sample_id("val/shard-00000/000000001", set(ids.values())) == (
        "val/shard-00000", "000000001")
    assert split_sample_id("a/b/c/key", {"a", "a/b"}) == ("a/b", "c/key")   # longest id wins
    assert split_sample_id("nope/key", {"a"}) == (None, "nope/key")


@pytest.mark.slow
def test_index_on_a_root_whose_folders_reuse_shard_names(ray_session, s3_server, tmp_path):
    from pipelines.index import run_index
    from pipelines.synth import synth
    from sdray.backbones import save_tiny
    from sdray.config import from_dict
    from sdray.model import RetrievalModel

    tiny = save_tiny("clip", tmp_path / "tinyclip")
    cfg = from_dict({"backbone": {"name": "clip", "path": str(tiny), "image_size": 32,
                                  "max_text_length": 64}})
    root = s3_server.uri("sameshardnames")
    model_uri = storage.join(root, "model")
    RetrievalModel.create(cfg).save(model_uri)
    data = storage.join(root, "data")
    synth(data, n=8, n_val=4, n_test=0, image_size=32, shard_size=8, splits=("train", "val"),
          progress=False)
    shards = list_shards(data)
    assert [s.rsplit("/", 1)[1] for s in shards] == ["shard-00000.tar", "shard-00000.tar"]
    out = storage.join(root, "index")
    summary = run_index(model_uri, data, out, 1, {"sparse": {"min_docs": 100000},
                                                  "dense": {"kind": "flat"}},
                        batch_size=16, progress=False)
    assert summary["samples"] == 8 + 8 and summary["counts"]["images"] == 4 + 4
    import pyarrow.parquet as pq

    metas = storage.list_files(out, ("meta.parquet",))
    uris = [u for f in metas for u in pq.read_table(io.BytesIO(storage.read_bytes(f)))
            .column("uri").to_pylist() if u]
    # every document points back into its own split's shard
    assert any(u.startswith(storage.join(data, "train", "shard-00000.tar#")) for u in uris)
    assert any(u.startswith(storage.join(data, "val", "shard-00000.tar#")) for u in uris)
    assert all(u.split("#")[0] in shards for u in uris)
