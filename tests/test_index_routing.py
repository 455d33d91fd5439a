"""Routing, exact dedupe and shard assembly of the index job's per-shard tasks (pure, no Ray),
and corpus sizing from metadata (issue 11)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdray.index.build import (DOC_NO_BITS, dedupe_rows, doc_hash, shard_data_from_rows, shard_of,
                               unique_doc_no)


def _rows(entries, dim=3):
    """Encoded rows like the job's Encoder emits: (id, sample_id, dense row, {term: value})."""
    dense = np.asarray([e[2] for e in entries], np.float32).reshape(len(entries), dim)
    offsets, idx, val = [0], [], []
    for e in entries:
        terms = sorted(e[3].items())
        idx += [t for t, _ in terms]
        val += [v for _, v in terms]
        offsets.append(len(idx))
    return pa.table({
        "id": [e[0] for e in entries], "sample_id": [e[1] for e in entries],
        "image_id": [f"img-of-{e[1]}" for e in entries], "caption": [f"cap-of-{e[1]}" for e in entries],
        "uri": [f"uri-of-{e[1]}" for e in entries],
        "doc_no": pa.array([doc_hash(e[0]) for e in entries], pa.int64()),
        "dense": pa.FixedSizeListArray.from_arrays(pa.array(dense.ravel()), dim),
        "sp_idx": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(idx, pa.int32())),
        "sp_val": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(val, pa.float32())),
    })


def test_doc_hash_is_stable_63_bit_and_routes_copies_together():
    ids = [f"img{i}" for i in range(2000)]
    h = np.array([doc_hash(i) for i in ids])
    assert (h >= 0).all() and (h < 2**DOC_NO_BITS).all()
    assert len(np.unique(h)) == len(ids)
    assert doc_hash("img7") == doc_hash("img7") == int(h[7])
    # the shard is the hash's residue: every copy of a document goes to the same shard
    assert (shard_of(ids + ids[:10], 7) == np.concatenate([h % 7, h[:10] % 7])).all()
    counts = np.bincount(shard_of(ids, 4), minlength=4)
    assert counts.min() > 400                                    # roughly balanced


def test_unique_doc_no_resolves_collisions_within_the_residue():
    doc_no = np.array([21, 5, 21, 21, 9], np.int64)            # 21 taken three times
    ids = ["c", "a", "b", "d", "e"]
    out = unique_doc_no(doc_no, ids, 4)
    assert len(np.unique(out)) == 5
    assert (out % 4 == doc_no % 4).all()                       # same shard, so no cross-shard clash
    # the smallest id keeps the hash; the others move up by the shard count, in id order
    assert out.tolist() == [25, 5, 21, 29, 9]
    assert (unique_doc_no(np.array([3, 8]), ["x", "y"], 5) == [3, 8]).all()


def test_dedupe_keeps_the_smallest_sample_id_and_orders_by_sample_id():
    t = _rows([("A", "s/3", [1, 0, 0], {5: 1.0}), ("B", "s/1", [0, 1, 0], {2: 2.0}),
               ("A", "s/0", [0, 0, 1], {7: 3.0}), ("B", "s/2", [1, 1, 0], {1: 4.0}),
               ("C", "s/9", [1, 0, 1], {})])
    kept = dedupe_rows(t)
    assert kept.column("sample_id").to_pylist() == ["s/0", "s/1", "s/9"]
    assert kept.column("id").to_pylist() == ["A", "B", "C"]


def test_shard_data_from_rows_builds_the_representatives_arrays():
    t = _rows([("A", "s/3", [1, 0, 0], {5: 1.0}), ("B", "s/1", [0, 1, 0], {2: 2.0, 9: 0.5}),
               ("A", "s/0", [0, 0, 1], {3: 3.0, 7: 1.5}), ("C", "s/9", [1, 0, 1], {})])
    # chunked input, as a shuffle delivers it
    t = pa.concat_tables([t.slice(0, 2), t.slice(2)])
    data = shard_data_from_rows(t, n_shards=3, vocab_size=10, dense_dim=3)
    assert data.ids == ["A", "B", "C"]
    assert data.image_ids == ["img-of-s/0", "img-of-s/1", "img-of-s/9"]
    assert data.captions == ["cap-of-s/0", "cap-of-s/1", "cap-of-s/9"]
    assert np.array_equal(data.dense, np.array([[0, 0, 1], [0, 1, 0], [1, 0, 1]], np.float32))
    dense_sparse = np.zeros((3, 10), np.float32)
    for r in range(3):
        cols, vals = data.sparse.row(r)
        dense_sparse[r, cols] = vals
    expect = np.zeros((3, 10), np.float32)
    expect[0, [3, 7]] = [3.0, 1.5]
    expect[1, [2, 9]] = [2.0, 0.5]
    assert np.array_equal(dense_sparse, expect)
    assert data.doc_no.tolist() == [doc_hash(i) for i in "ABC"]
    empty = shard_data_from_rows(t.slice(0, 0), 3, 10, 3)
    assert empty.ids == [] and empty.dense.shape == (0, 3) and empty.sparse.n_rows == 0


def test_corpus_size_from_footers_and_manifest(tmp_path):
    from pipelines.corpus_size import feature_corpus_size, parquet_rows, raw_corpus_size

    feats = tmp_path / "features"
    feats.mkdir()
    for i, n in enumerate((7, 5)):
        pq.write_table(pa.table({"sample_id": [f"s{i}/{j}" for j in range(n)],
                                 "image_features": pa.array([[0.0]] * n)}), feats / f"part-{i}.parquet")
    size = feature_corpus_size(str(feats))
    assert (size.rows, size.exact) == (12, True)
    (feats / "manifest.json").write_text(json.dumps({"n_samples": 40, "image_dim": 1, "text_dim": 1}))
    assert feature_corpus_size(str(feats)).rows == 40          # the featurize manifest wins
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"image": [b"x"] * 9, "caption": ["c"] * 9}), raw / "00000.parquet")
    assert parquet_rows([str(raw / "00000.parquet")]) == 9
    size = raw_corpus_size(str(raw))
    assert (size.rows, size.exact) == (9, True)
    with pytest.raises(FileNotFoundError):
        feature_corpus_size(str(tmp_path / "missing"))
