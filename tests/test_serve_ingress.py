"""The ingress's search path end to end without Ray: a real demo index in ShardGroups behind
stand-in handles, the in-ingress encoder (``encoder_in_ingress``), HTTP requests through the
route methods — pinned snapshots, signed thumbnails, allow_partial, deadlines, 4xx bodies."""

import asyncio
import json
import shutil
import types
from pathlib import Path

import pytest

from serve.config import ServeConfig
from serve.shard_group import Fusion, ShardGroup

KEY = "ingress-test-key"


class _Remote:
    def __init__(self, fn, fail=False, delay=0.0):
        self.fn, self.fail, self.delay = fn, fail, delay

    def remote(self, *a):
        async def call():
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail:
                raise RuntimeError("replica died: internal detail")
            return await asyncio.to_thread(self.fn, *a)
        return call()


def _group(sg: ShardGroup, fail=False, delay=0.0):
    def search(version, direction, dense, ids, vals, mode, k, candidates, fusion, explain):
        return sg.search(version, direction, dense, ids, vals, mode, k, candidates, Fusion(**fusion), explain)

    return types.SimpleNamespace(
        search=_Remote(search, fail, delay),
        explain=_Remote(sg.explain, fail), find=_Remote(sg.find, fail),
        status=_Remote(lambda v: {"loaded": sg.loaded(v), "error": False, "versions": sg.versions()}))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from serve.testing import build_demo_index

    return build_demo_index(str(tmp_path_factory.mktemp("ingress")), n_images=10, shards=3)


def _ingress(demo, fail_group=None, delay=0.0, **cfg):
    from serve.ingress import Ingress

    groups = [_group(ShardGroup(demo.index, g, 3), fail=g == fail_group, delay=delay) for g in range(3)]
    cls = Ingress.func_or_class.__mro__[1]
    conf = ServeConfig(index=demo.index, poll_interval_s=0, encoder_in_ingress=True, auth_token=KEY, **cfg)
    return cls(conf.model_dump(), None, groups)


def _request(method, path, body=b"", key=KEY, query=b""):
    from starlette.requests import Request

    headers = [(b"content-type", b"application/json")]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    sent = {"done": False}

    async def receive():
        if sent["done"]:
            return {"type": "http.disconnect"}
        sent["done"] = True
        return {"type": "http.request", "body": body, "more_body": False}

    req = Request({"type": "http", "method": method, "path": path, "headers": headers,
                   "query_string": query}, receive)
    req.state.rid = "test-rid"
    return req


def _search(ing, body, key=KEY):
    resp = asyncio.run(ing.search(_request("POST", "/v1/search", json.dumps(body).encode(), key)))
    return resp.status_code, json.loads(resp.body), resp


def test_search_through_the_ingress_with_the_encoder_inside(demo):
    ing = _ingress(demo)
    for mode in ("hybrid", "dense", "sparse"):
        status, body, _ = _search(ing, {"text": "a red circle", "k": 4, "mode": mode})
        assert status == 200, body
        assert len(body["hits"]) == 4 and body["index_version"] == demo.version and body["shards_failed"] == 0
        assert all(h["id"] in demo.image_ids for h in body["hits"])
    status, body, _ = _search(ing, {"text": "a red circle", "k": 3, "fusion": {"method": "rrf"}})
    assert status == 200 and all(h["explanation"] for h in body["hits"])  # late explanations
    thumb = body["hits"][0]["thumbnail"]
    assert KEY not in thumb and "sig=" in thumb
    path, _, query = thumb.partition("?")
    params = dict(p.split("=") for p in query.split("&"))
    doc_id = path.rsplit("/", 1)[1]
    resp = asyncio.run(ing.image(doc_id, _request("GET", "/" + path, key=None), int(params["size"]),
                                 params["exp"], params["sig"]))
    assert resp.status_code == 200 and resp.body[:2] == b"\xff\xd8"
    resp = asyncio.run(ing.image(doc_id, _request("GET", "/" + path, key=None), 256, params["exp"], "0" * 64))
    assert resp.status_code == 401
    status, body, _ = _search(ing, {"text": "a red circle"}, key="wrong-key-123")
    assert status == 401


def test_a_failed_group_is_503_or_partial_and_never_leaks_exception_text(demo):
    ing = _ingress(demo, fail_group=1)
    status, body, resp = _search(ing, {"text": "a blue square", "k": 10})
    assert status == 503 and resp.headers["Retry-After"] == "1"
    assert "internal detail" not in body["error"] and "allow_partial" in body["error"]
    status, body, _ = _search(ing, {"text": "a blue square", "k": 10, "allow_partial": True})
    assert status == 200 and body["shards_failed"] == 1
    assert all(h["shard"] % 3 != 1 for h in body["hits"]) and body["hits"]


def test_one_deadline_for_the_whole_request(demo):
    ing = _ingress(demo, delay=1.0, request_timeout_s=0.5)
    status, body, _ = _search(ing, {"text": "a green star", "k": 3})
    assert status == 504 and "deadline" in body["error"]


def test_rate_limit_per_key(demo):
    ing = _ingress(demo, rate_limit_per_s=0.01, rate_burst=2)
    assert [_search(ing, {"text": "a", "k": 1})[0] for _ in range(3)] == [200, 200, 429]
    status, body, resp = _search(ing, {"text": "a", "k": 1})
    assert status == 429 and int(resp.headers["Retry-After"]) >= 1


def _hits(body):
    return [(h["id"], h["shard"], round(h["score"], 5), [e["term"] for e in h["explanation"]])
            for h in body["hits"]]


def test_shards_in_the_ingress_answer_exactly_as_the_shard_group_handles(demo):
    from serve.ingress import Ingress

    local = Ingress.func_or_class.__mro__[1](ServeConfig(index=demo.index, poll_interval_s=0, encoder_in_ingress=True,
                                    auth_token=KEY, shards_in_ingress=True).model_dump(), None, [])
    assert local.local_shards and len(local.groups) == 1
    assert local.groups[0].group.versions() == [demo.version]  # loaded in the constructor
    remote = _ingress(demo)
    bodies = [{"text": "a red circle", "k": 5, "mode": m} for m in ("hybrid", "dense", "sparse")]
    bodies += [{"text": "two blue squares", "k": 4, "fusion": {"method": "rrf"}}]
    for body in bodies:
        (s1, b1, _), (s2, b2, _) = _search(local, body), _search(remote, body)
        assert s1 == s2 == 200
        assert _hits(b1) == _hits(b2) and b1["hits"], body
    ready, info = asyncio.run(local._readiness())
    assert ready and info["shards_ready"] == 3
    searcher = local.groups[0]
    copy = Path(demo.index) / "v-copy"
    shutil.copytree(Path(demo.index) / demo.version, copy)
    try:  # a swap: the new version preloaded next to the served one, the old one retired after
        asyncio.run(searcher.prepare("v-copy"))
        assert searcher.group.versions() == [demo.version, "v-copy"]
        searcher.serve("v-copy")
        searcher.retire()
        assert searcher.group.versions() == ["v-copy"]
    finally:
        shutil.rmtree(copy)


def test_concurrent_queries_share_one_forward_pass_and_equal_unbatched_ones(demo):
    import numpy as np

    from serve.encoder import LocalEncoder, Models, encode_batch

    enc = LocalEncoder(demo.model, max_batch_size=16)
    texts = ["a red circle", "two blue squares", "a green star", "three purple rings",
             "a yellow triangle", "small cyan dots", "a white cross on black", "a violet rhombus"]

    async def together():
        return await asyncio.gather(*(enc.encode_text(t, demo.model) for t in texts))

    batched = asyncio.run(together())
    single = [encode_batch(Models(), "text", [t], [demo.model])[0] for t in texts]
    assert max(r["batch_size"] for r in batched) > 1  # the queries did share a forward pass
    for b, s in zip(batched, single):
        assert s["batch_size"] == 1
        np.testing.assert_allclose(b["dense"], s["dense"], rtol=1e-5, atol=1e-6)
        assert b["sparse_ids"].tolist() == s["sparse_ids"].tolist()
        np.testing.assert_allclose(b["sparse_vals"], s["sparse_vals"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_thumbnail_storage_fault_is_retried_or_503_and_a_missing_object_is_404(s3_server, tmp_path, monkeypatch):
    """Thumbnails read from the real S3 server behind a fault-injecting proxy: transient resets
    are retried (200), a store that stays down answers 503 (JSON, Retry-After, no exception
    text), and an object that really is gone answers 404."""
    from sdray import storage
    from sdray.config import StorageConfig
    from serve.testing import build_demo_index
    from tests.faultproxy import FaultProxy

    demo_s3 = build_demo_index(s3_server.uri("ingress-faults"), n_images=4, shards=3)
    budget = StorageConfig(max_attempts=2, connect_timeout_s=1, read_timeout_s=1, write_timeout_s=3,
                           body_attempts=1, shard_attempts=3, backoff_s=0.05, backoff_max_s=0.2)
    with FaultProxy(s3_server.port) as proxy, storage.retries(budget):
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        ing = _ingress(demo_s3)

        def get(doc_id, size):
            return asyncio.run(ing.image(doc_id, _request("GET", f"/v1/images/{doc_id}"), size))

        first, second, third = demo_s3.image_ids[:3]
        assert get(first, 64).status_code == 200            # loads the snapshot, indexes the tar
        proxy.reset(3)
        resp = get(second, 64)
        assert resp.status_code == 200 and resp.body[:2] == b"\xff\xd8", proxy.injected
        assert proxy.injected["reset"] == 3

        proxy.down()
        resp = get(third, 64)
        body = json.loads(resp.body)
        assert resp.status_code == 503 and resp.headers["retry-after"] and set(body) == {"error"}, body
        assert "Error" not in body["error"] and "s3://" not in body["error"], body

        proxy.up()
        assert get(third, 64).status_code == 200            # back: the same image is served
        fs, path = storage.filesystem(demo_s3.corpus)       # the corpus really is gone
        fs.rm(path)
        resp = get(first, 96)                                # not cached at this size
        assert resp.status_code == 404 and set(json.loads(resp.body)) == {"error"}


def _original(demo, image_id: str) -> bytes:
    """The image bytes of ``image_id`` in the demo's corpus, read whole (the reference)."""
    import io

    from sdray import storage
    from sdray.data.formats import iter_shard_samples
    from sdray.data.skips import SkipCounts

    data = storage.read_bytes(demo.corpus)
    return next(s["image"] for s in iter_shard_samples(io.BytesIO(data), demo.corpus, SkipCounts())
                if s["image_id"] == image_id)


@pytest.mark.slow
def test_thumbnails_on_s3_read_one_image_not_the_shard(s3_server, tmp_path, monkeypatch):
    """Through the route, from the real S3 server: the bytes the store sends back (counted by a
    proxy) for one thumbnail are one Parquet row group or one tar member, not the shard, and the
    JPEG is that document's image. Past ``image_read_max_bytes``: a 307 to the source url when the
    document has one, else a JSON 404."""
    import pyarrow.parquet as pq

    from sdray import storage
    from serve import images
    from serve.testing import build_demo_index
    from tests.faultproxy import FaultProxy

    pq_demo = build_demo_index(s3_server.uri("thumbs-parquet"), n_images=16, shards=3,
                               corpus_format="parquet", row_group_size=4)
    tar_demo = build_demo_index(s3_server.uri("thumbs-tar"), n_images=16, shards=3, source_urls=True)
    with FaultProxy(s3_server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        images._FOOTERS.clear()

        def served(ing, doc_id):
            """The 64 px answer and the fewest bytes the store sent for one read of the image
            (two reads, 64 and 72 px, each past the thumbnail cache): a thread of an earlier
            test's replica reading through the same endpoint can land in one window, not both."""
            counts, resp = [], None
            for size in (64, 72):
                before = proxy.bytes_served
                answer = asyncio.run(ing.image(doc_id, _request("GET", f"/v1/images/{doc_id}"), size))
                counts.append(proxy.bytes_served - before)
                resp = resp or answer
            return resp, min(counts)

        # Parquet: after the footer is known, one row group's image and key columns
        ing = _ingress(pq_demo)
        corpus_size = len(storage.read_bytes(pq_demo.corpus))
        md = pq.read_metadata(storage.open_uri(pq_demo.corpus, "rb"))
        group = max(md.row_group(g).column(i).total_compressed_size for g in range(md.num_row_groups)
                    for i in range(md.num_columns) if md.row_group(g).column(i).path_in_schema == "image")
        first, *others = pq_demo.image_ids
        assert served(ing, first)[0].status_code == 200          # loads the index and the footer
        for doc_id in others[:3]:
            resp, n = served(ing, doc_id)
            expected = images.thumbnail(_original(pq_demo, doc_id), 64)
            assert resp.status_code == 200 and resp.body == expected
            assert n < 2 * group + 4096 and n < corpus_size / 3, (n, group, corpus_size)

        # tar: the member (with its header) in one range request
        ing = _ingress(tar_demo)
        corpus_size = len(storage.read_bytes(tar_demo.corpus))
        first, *others = tar_demo.image_ids
        assert served(ing, first)[0].status_code == 200
        for doc_id in others[:3]:
            raw = _original(tar_demo, doc_id)
            resp, n = served(ing, doc_id)
            assert resp.status_code == 200 and resp.body == images.thumbnail(raw, 64)
            assert n < len(raw) + 512 + 4096 and n < corpus_size / 8, (n, len(raw), corpus_size)

        # past the cap: the source url (tar corpus), else 404 (the Parquet corpus has none)
        resp, _ = served(_ingress(tar_demo, image_read_max_bytes=1024), others[4])
        assert resp.status_code == 307 and resp.headers["location"].startswith("https://images.example/")
        resp, _ = served(_ingress(pq_demo, image_read_max_bytes=1024), pq_demo.image_ids[5])
        body = json.loads(resp.body)
        assert resp.status_code == 404 and "image_read_max_bytes" in body["error"] and "s3://" not in body["error"]


def _is_fixed_503(resp, secret: str) -> bool:
    body = json.loads(resp.body)
    return (resp.status_code == 503 and int(resp.headers["Retry-After"]) >= 1 and set(body) == {"error"}
            and secret not in body["error"])


def test_loading_the_served_version_is_under_the_deadline_and_its_failure_is_a_503(demo, monkeypatch):
    import time

    from sdray.index import manifest as mf

    real = mf.load_manifest

    def storage_down(*a, **kw):
        raise OSError("connection reset by s3://secret-bucket")

    ing, slow_ing = _ingress(demo), _ingress(demo, request_timeout_s=0.3)
    monkeypatch.setattr(mf, "load_manifest", storage_down)
    _, _, resp = _search(ing, {"text": "a red circle", "k": 3})
    assert _is_fixed_503(resp, "secret-bucket")
    resp = asyncio.run(ing.image(demo.image_ids[0], _request("GET", "/v1/images/x"), 64))
    assert _is_fixed_503(resp, "secret-bucket")

    def slow(*a, **kw):
        time.sleep(1.0)
        return real(*a, **kw)

    monkeypatch.setattr(mf, "load_manifest", slow)
    status, body, _ = _search(slow_ing, {"text": "a red circle", "k": 3})
    assert status == 504 and "deadline" in body["error"]
    monkeypatch.setattr(mf, "load_manifest", real)
    status, _, _ = _search(ing, {"text": "a red circle", "k": 3})   # the store is back
    assert status == 200


def test_a_dead_shard_group_gives_the_image_route_a_503_not_a_500(demo):
    ing = _ingress(demo, fail_group=1)
    statuses = set()
    for doc_id in [*demo.image_ids, "no-such-image"]:
        resp = asyncio.run(ing.image(doc_id, _request("GET", f"/v1/images/{doc_id}"), 64))
        assert resp.status_code in (200, 503), resp.body
        if resp.status_code == 503:
            assert _is_fixed_503(resp, "internal detail")
        statuses.add(resp.status_code)
    assert statuses == {200, 503}  # images the live groups hold are served; the missing one may be in group 1


def test_every_log_line_about_a_request_carries_its_id(demo, caplog):
    import logging

    ing = _ingress(demo, fail_group=1)
    with caplog.at_level(logging.INFO, logger="sdray.serve"):
        status, _, _ = _search(ing, {"text": "a blue square", "k": 10})
        logging.getLogger("sdray.serve").warning("between requests")
    assert status == 503
    during = [r for r in caplog.records if r.getMessage() != "between requests"]
    assert any("shard group 1 failed" in r.getMessage() for r in during)
    for record in during:   # the failed group's warning and the 503 line among them
        assert record.request_id == "test-rid" and record.getMessage().startswith("[request test-rid] ")
    after = next(r for r in caplog.records if r.getMessage() == "between requests")
    assert after.request_id == "-"


class _RayMetric:
    """Stands in for a ray.util.metrics Counter/Histogram; records what is observed."""

    seen: list = []

    def __init__(self, name, description="", boundaries=None, tag_keys=()):
        self.name, self.tag_keys = name, tag_keys

    def inc(self, value=1.0, tags=None):
        self._record(value, tags)

    def observe(self, value, tags=None):
        self._record(value, tags)

    def _record(self, value, tags):
        assert set(tags or {}) == set(self.tag_keys), (self.name, tags)
        self.seen.append((self.name, value, dict(tags or {})))


def test_metrics_go_through_ray_metrics_with_the_encoder_inside_the_ingress(demo, monkeypatch):
    from ray.util import metrics as ray_metrics

    monkeypatch.setattr(_RayMetric, "seen", [])
    monkeypatch.setattr(ray_metrics, "Counter", _RayMetric)
    monkeypatch.setattr(ray_metrics, "Histogram", _RayMetric)
    ing = _ingress(demo)
    assert ing.local_encoder
    status, _, _ = _search(ing, {"text": "a red circle", "k": 3})
    assert status == 200
    seen = _RayMetric.seen
    assert ("sdray_encoder_batch_size", 1, {"kind": "text"}) in seen      # the in-ingress encoder's batch
    assert ("sdray_http_requests", 1.0, {"route": "/v1/search", "status": "200"}) in seen
    stages = {tags["stage"] for name, _, tags in seen if name == "sdray_stage_latency_ms"}
    assert {"parse", "encode", "search", "fuse"} <= stages
