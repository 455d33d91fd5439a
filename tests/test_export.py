"""`sdray export`: the Parquet table, and a round trip into Milvus Lite that must rank like sdray."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main as cli_main
from sdray.backbones import save_tiny
from sdray.config import from_dict
from sdray.export import read_vectors, top_terms, vectors_table
from sdray.model import RetrievalModel

N_IMAGES, CAPTIONS_PER_IMAGE, N_QUERIES, K = 120, 2, 20, 10


def _url(image_id: str) -> str | None:
    """img2dataset-style source URLs for even images; odd ones have none (a corpus without urls)."""
    return f"https://example.test/{image_id}.jpg" if int(image_id[3:]) % 2 == 0 else None


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model, feature shards of N_IMAGES images x 2 captions, and both sides exported."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = from_dict({"backbone": {"name": "clip", "path": str(save_tiny("clip", tmp / "tiny")),
                                  "image_size": 32, "max_text_length": 16}})
    model = RetrievalModel.create(cfg)
    model.save(str(tmp / "model"))
    rng = np.random.default_rng(7)
    img_feats = rng.normal(size=(N_IMAGES, model.backbone.image_dim)).astype(np.float32)
    rows = []
    for i in range(N_IMAGES):
        for c in range(CAPTIONS_PER_IMAGE):
            rows.append({"sample_id": f"s{i}-{c}", "image_id": f"img{i:04d}", "caption": f"caption {i} {c}",
                         "input_ids": [2, 3], "text_features": rng.normal(size=model.backbone.text_dim).astype(np.float32),
                         "image_features": img_feats[i]})
    (tmp / "features").mkdir()
    for shard in range(2):
        part = rows[shard::2]
        table = pa.table({
            "sample_id": [r["sample_id"] for r in part], "image_id": [r["image_id"] for r in part],
            "caption": [r["caption"] for r in part], "url": [_url(r["image_id"]) for r in part],
            "input_ids": pa.array([r["input_ids"] for r in part], pa.list_(pa.int32())),
            "text_features": pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate([r["text_features"] for r in part])), model.backbone.text_dim),
            "image_features": pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate([r["image_features"] for r in part])), model.backbone.image_dim)})
        pq.write_table(table, tmp / "features" / f"shard-{shard:05d}.parquet")
    for side in ("images", "captions"):
        rc = cli_main(["export", "--model", str(tmp / "model"), "--corpus", str(tmp / "features"),
                       "--out", str(tmp / f"{side}.parquet"), "--side", side, "--top-terms", "5"])
        assert rc == 0
    return tmp, model


def test_export_table_has_every_column_and_exact_vectors(exported):
    tmp, model = exported
    table, meta = read_vectors((tmp / "images.parquet").read_bytes())
    assert table.num_rows == N_IMAGES and meta["side"] == "images"
    assert meta["dense_dim"] == model.backbone.proj_dim and meta["vocab_size"] == len(model.vocabulary)
    assert table.column("id").to_pylist() == table.column("image_id").to_pylist()
    urls = dict(zip(table.column("image_id").to_pylist(), table.column("url").to_pylist()))
    assert urls == {iid: _url(iid) or "" for iid in urls} and sum(map(bool, urls.values())) == N_IMAGES // 2
    ids = table.column("image_id").to_pylist()
    assert len(set(ids)) == N_IMAGES
    caps, _ = read_vectors((tmp / "captions.parquet").read_bytes())
    assert [u or "" for u in map(_url, caps.column("image_id").to_pylist())] == caps.column("url").to_pylist()
    assert caps.num_rows == N_IMAGES * CAPTIONS_PER_IMAGE and len(set(caps.column("id").to_pylist())) == caps.num_rows
    row = table.slice(3, 1).to_pylist()[0]
    idx, val = np.array(row["sparse_indices"]), np.array(row["sparse_values"], np.float32)
    assert (np.diff(idx) > 0).all() and (val > 0).all()
    assert abs(np.linalg.norm(row["dense"]) - 1) < 1e-5
    heaviest = [model.vocabulary[i] for i in idx[np.argsort(-val, kind="stable")][:5]]
    assert row["top_terms"] == heaviest


def test_vectors_table_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="vocabulary size"):
        vectors_table(["a"], ["a"], ["x"], None, np.ones((1, 2)), np.ones((1, 3)), ["p", "q"])
    assert top_terms(np.array([4, 1, 2]), np.array([0.5, 2.0, 0.5], np.float32), list("abcde"), 2) == ["b", "c"]


def _exact_topk(scores: np.ndarray, ids: list[str], k: int) -> list[list[str]]:
    order = np.lexsort((np.arange(scores.shape[1])[None].repeat(len(scores), 0), -scores), axis=1)
    return [[ids[j] for j in row[:k]] for row in order]


def _same_ranking(got: list[tuple[str, float]], want: list[str], scores: dict[str, float]) -> bool:
    """Equal ids in order, up to swaps between scores equal within float32 rounding."""
    if [g for g, _ in got] == want:
        return True
    if len(got) != len(want):
        return False
    tie = lambda a, b: abs(scores[a] - scores[b]) <= 1e-5 * max(1.0, abs(scores[a]))
    return all(g == w or tie(g, w) for (g, _), w in zip(got, want)) and \
        {g for g, _ in got} - set(want) <= {g for g, _ in got if tie(g, want[-1])}


def _queries_and_exact_scores(tmp):
    """The images table's rows, the first N_QUERIES exported captions (encoded as sdray encodes
    queries) and sdray's exact dense and sparse scores of every query against every image."""
    table, meta = read_vectors((tmp / "images.parquet").read_bytes())
    rows = table.to_pylist()
    queries, _ = read_vectors((tmp / "captions.parquet").read_bytes())
    queries = queries.slice(0, N_QUERIES).to_pylist()

    def densify(items):
        out = np.zeros((len(items), meta["vocab_size"]), np.float32)
        for i, r in enumerate(items):
            out[i, r["sparse_indices"]] = r["sparse_values"]
        return out

    doc_dense = np.array([r["dense"] for r in rows], np.float32)
    q_dense = np.array([q["dense"] for q in queries], np.float32)
    scores = {"dense": q_dense @ doc_dense.T, "sparse": densify(queries) @ densify(rows).T}
    for field, s in scores.items():
        assert (np.sort(s, 1)[:, -K] > 0).all(), f"{field}: fewer than {K} positive scores"
    return rows, meta, queries, scores


def _check_engine_top_k(search, rows, queries, scores) -> None:
    """``search(field, queries) -> [[(id, score)] * K] * N_QUERIES`` ranks like sdray's exact top K."""
    ids = [r["id"] for r in rows]
    for field in ("dense", "sparse"):
        want = _exact_topk(scores[field], ids, K)
        got_all = search(field, queries)
        for qi in range(N_QUERIES):
            got = got_all[qi]
            by_id = dict(zip(ids, scores[field][qi].tolist()))
            assert _same_ranking(got, want[qi], by_id), (field, qi, got, want[qi])
            assert np.allclose([d for _, d in got], [by_id[g] for g, _ in got], rtol=1e-4, atol=1e-5)


def test_milvus_lite_round_trip_ranks_like_sdray(exported):
    pytest.importorskip("pymilvus")
    from pymilvus import DataType, MilvusClient

    tmp, model = exported
    rows, meta, queries, scores = _queries_and_exact_scores(tmp)
    client = MilvusClient(str(tmp / "milvus.db"))
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=128)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=meta["dense_dim"])
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    params = client.prepare_index_params()
    params.add_index("dense", index_type="FLAT", metric_type="IP")
    params.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
    client.create_collection("images", schema=schema, index_params=params)
    client.insert("images", [{"id": r["id"], "dense": r["dense"],
                              "sparse": dict(zip(r["sparse_indices"], r["sparse_values"]))} for r in rows])
    client.load_collection("images")

    def search(field, qs):
        vecs = [q["dense"] for q in qs] if field == "dense" else \
            [dict(zip(q["sparse_indices"], q["sparse_values"])) for q in qs]
        res = client.search("images", vecs, anns_field=field, limit=K, search_params={"metric_type": "IP"})
        return [[(h["id"], h["distance"]) for h in hits] for hits in res]

    _check_engine_top_k(search, rows, queries, scores)
    client.close()


def test_qdrant_local_round_trip_ranks_like_sdray(exported):
    """The guide's Qdrant recipe (named dense + sparse vectors) on qdrant-client's local mode."""
    pytest.importorskip("qdrant_client")
    import uuid

    from qdrant_client import QdrantClient, models

    tmp, _ = exported
    rows, meta, queries, scores = _queries_and_exact_scores(tmp)
    client = QdrantClient(path=str(tmp / "qdrant"))
    client.create_collection(
        "images",
        vectors_config={"dense": models.VectorParams(size=meta["dense_dim"], distance=models.Distance.DOT)},
        sparse_vectors_config={"sparse": models.SparseVectorParams()},
    )
    client.upsert("images", [models.PointStruct(
        id=str(uuid.uuid5(uuid.NAMESPACE_URL, r["id"])),
        vector={"dense": r["dense"],
                "sparse": models.SparseVector(indices=r["sparse_indices"], values=r["sparse_values"])},
        payload={"id": r["id"], "image_id": r["image_id"], "caption": r["caption"], "url": r["url"],
                 "top_terms": r["top_terms"]},
    ) for r in rows])
    assert client.count("images").count == len(rows)

    def search(field, qs):
        out = []
        for q in qs:
            vec = q["dense"] if field == "dense" else \
                models.SparseVector(indices=q["sparse_indices"], values=q["sparse_values"])
            hits = client.query_points("images", query=vec, using=field, limit=K, with_payload=True).points
            out.append([(h.payload["id"], h.score) for h in hits])
        return out

    _check_engine_top_k(search, rows, queries, scores)
    client.close()


def test_export_from_an_index_gives_the_stored_vectors(exported):
    from sdray.index import ShardData, build_index

    tmp, model = exported
    table, _ = read_vectors((tmp / "images.parquet").read_bytes())
    rows = table.to_pylist()
    sparse = np.zeros((len(rows), len(model.vocabulary)), np.float32)
    for i, r in enumerate(rows):
        sparse[i, r["sparse_indices"]] = r["sparse_values"]
    ids = [r["id"] for r in rows]
    data = ShardData(dense=np.array([r["dense"] for r in rows], np.float32), sparse=sparse, ids=ids,
                     image_ids=ids, captions=[r["caption"] for r in rows], uris=[None] * len(rows),
                     urls=[r["url"] or None for r in rows], vocab_size=len(model.vocabulary))
    build_index(str(tmp / "index"), {"images": data}, n_shards=3, vocabulary=model.vocabulary)
    assert cli_main(["export", "--index", str(tmp / "index"), "--out", str(tmp / "from-index.parquet")]) == 0
    got, meta = read_vectors((tmp / "from-index.parquet").read_bytes())
    assert meta["side"] == "images" and meta["version"]
    by_id = {r["id"]: r for r in got.to_pylist()}
    assert set(by_id) == set(ids)
    for r in rows:
        g = by_id[r["id"]]
        assert g["sparse_indices"] == r["sparse_indices"] and g["top_terms"][:5] == r["top_terms"]
        assert g["url"] == r["url"]
        assert np.allclose(g["dense"], r["dense"]) and np.allclose(g["sparse_values"], r["sparse_values"])
    assert cli_main(["export", "--index", str(tmp / "index"), "--model", "m", "--out", "x"]) == 3
