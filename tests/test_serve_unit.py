"""The Serve app's pure parts, without Ray: request validation, shard merging, health logic,
config, client and page. (The deployed app is tested in test_serve.py.)"""

import asyncio
import base64
import io
import json
import types

import numpy as np
import pytest
from PIL import Image

from serve.config import DeploymentKnobs, ServeConfig
from serve.request import ApiError, parse_request
from serve.shard_group import Fusion, ShardGroup, merge

CFG = ServeConfig(index="/nonexistent", k_max=50, max_image_bytes=200_000, max_image_pixels=1_000_000)


def png(w=32, h=24, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def parse(body, ctype="application/json", cfg=CFG):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(data, ctype, cfg)


def error_of(body, ctype="application/json", cfg=CFG) -> ApiError:
    with pytest.raises(ApiError) as exc:
        parse(body, ctype, cfg)
    assert 400 <= exc.value.status < 500
    return exc.value


# ---------------------------------------------------------------------------- validation

def test_valid_text_and_image_requests():
    q = parse({"text": "  a red circle ", "k": 5, "mode": "sparse"})
    assert (q.text, q.image, q.k, q.mode, q.direction) == ("a red circle", None, 5, "sparse", "t2i")
    q = parse({"image": base64.b64encode(png()).decode(), "fusion": {"method": "rrf", "w1": 1}})
    assert q.image == png() and q.direction == "i2t" and q.k == CFG.k_default and q.mode == "hybrid"
    assert q.fusion.method == "rrf" and q.fusion.w1 == 1.0
    data_uri = "data:image/png;base64," + base64.urlsafe_b64encode(png()).decode().rstrip("=")
    assert parse({"image": data_uri}).image == png()


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "empty request body"),
    (b"[1, 2]", 422, "JSON object"),
    ({"text": ""}, 422, "text: empty"),
    ({"text": "   "}, 422, "text: empty"),
    ({"text": 3}, 422, "text: Input should be a valid string"),
    ({"text": "a", "k": "5"}, 422, "k: Input should be a valid integer"),
    ({"text": "a", "k": 1.5}, 422, "k: Input should be a valid integer"),
    ({"text": "a", "k": True}, 422, "k: Input should be a valid integer"),
    ({"text": "a", "k": 0}, 422, "k: must be between 1 and 50"),
    ({"text": "a", "k": 51}, 422, "k: must be between 1 and 50"),
    ({"text": "a", "mode": "fuzzy"}, 422, "unknown mode 'fuzzy'"),
    ({"text": "a", "mode": 1}, 422, "mode: Input should be a valid string"),
    ({"text": "a", "fusion": {"method": "max"}}, 422, "fusion.method"),
    ({"text": "a", "fusion": {"w1": -1}}, 422, "fusion.w1"),
    ({"text": "a", "colour": "red"}, 422, "colour: unknown field"),
    ({}, 422, "give one of text"),
    ({"text": "a", "image": "aGVsbG8="}, 422, "not both"),
    ({"image": "%%%"}, 422, "not valid base64"),
    ({"image": base64.b64encode(b"hello, not an image").decode()}, 422, "cannot be decoded"),
    ({"image": base64.b64encode(png()[:60]).decode()}, 422, "image"),
    ({"image": ""}, 422, "image: empty"),
    ({"text": "x" * 1001}, 422, "more than the 1000 allowed"),
])
def test_bad_requests_get_a_4xx_that_says_what_is_wrong(body, status, words):
    err = error_of(body)
    assert err.status == status
    assert words in err.message


def test_oversized_images_are_rejected_by_bytes_and_by_pixels():
    big = base64.b64encode(b"\0" * 300_000).decode()
    assert error_of({"image": big}).status == 413
    bomb = png(2000, 1000)  # 2 MP > 1 MP limit, small file
    err = error_of({"image": base64.b64encode(bomb).decode()})
    assert err.status == 413 and "pixels" in err.message
    cfg = CFG.model_copy(update={"max_body_bytes": 2048})
    assert error_of({"text": "x" * 3000}, cfg=cfg).status == 413


def test_unsupported_content_type_is_415():
    assert error_of(b"text=a", "application/x-www-form-urlencoded").status == 415


def multipart(fields: dict, files: dict, boundary="XyZ123") -> tuple[bytes, str]:
    out = b""
    for name, val in fields.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{val}\r\n").encode()
    for name, (fname, data) in files.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{fname}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def test_multipart_upload():
    body, ctype = multipart({"k": "3", "mode": "dense", "fusion.method": "rrf"}, {"image": ("x.png", png())})
    q = parse(body, ctype)
    assert q.image == png() and q.k == 3 and q.mode == "dense" and q.fusion.method == "rrf"
    body, ctype = multipart({"text": "a cat"}, {})
    assert parse(body, ctype).text == "a cat"
    body, ctype = multipart({"text": "a cat", "k": "many"}, {})
    assert "k: must be an integer" in error_of(body, ctype).message
    body, ctype = multipart({"text": "a cat"}, {"image": ("x.png", png())})
    assert "not both" in error_of(body, ctype).message
    body, ctype = multipart({}, {"image": ("x.png", b"garbage")})
    assert "cannot be decoded" in error_of(body, ctype).message
    assert error_of(b"--nope", "multipart/form-data").status == 400


def test_a_multipart_parser_failure_is_a_fixed_400(monkeypatch):
    import email.parser

    def broken(self, data, headersonly=False):
        raise ValueError("parser internals at 0x7f00")

    monkeypatch.setattr(email.parser.BytesParser, "parsebytes", broken)
    err = error_of(*multipart({"k": "3"}, {"image": ("x.png", png())}))
    assert err.status == 400 and "multipart" in err.message and "0x7f00" not in err.message



# ---------------------------------------------------------------------------- config

def test_deployment_knobs_map_to_serve_options():
    fixed = DeploymentKnobs(min_replicas=2, max_replicas=2).options()
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    auto = DeploymentKnobs(min_replicas=1, max_replicas=4, target_ongoing_requests=3).options()
    assert auto["autoscaling_config"]["max_replicas"] == 4
    assert auto["autoscaling_config"]["target_ongoing_requests"] == 3
    with pytest.raises(ValueError):
        DeploymentKnobs(min_replicas=3, max_replicas=1)
    with pytest.raises(ValueError):
        ServeConfig(index="x", k_default=20, k_max=10)


def test_yaml_config_is_a_valid_serve_config():
    import pathlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = pathlib.Path(__file__).parents[1] / "serve" / "config.yaml"
    data = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(data)
    app = data["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    ServeConfig.model_validate(app["args"])
    assert data["http_options"]["host"] == "127.0.0.1"


def test_serve_cli_flags_build_the_config(tmp_path):
    import argparse

    from pipelines import serve as serve_cli

    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    f = tmp_path / "s.yaml"
    f.write_text("k_max: 20\nbatch: {max_batch_size: 4}\n")
    args = p.parse_args(["--index", "s3://b/idx", "--port", "9000", "--config", str(f),
                         "--replicas-per-shard", "2", "--encoder-max-replicas", "3", "--auth-token", "t"])
    cfg = serve_cli.config_from_args(args)
    assert (cfg.index, cfg.port, cfg.k_max, cfg.batch.max_batch_size) == ("s3://b/idx", 9000, 20, 4)
    assert cfg.shards.min_replicas == cfg.shards.max_replicas == 2
    assert cfg.encoder.max_replicas == 3 and cfg.auth_token == "t"


# ---------------------------------------------------------------------------- searching

@pytest.fixture(scope="module")
def random_index(tmp_path_factory):
    """A 3-shard index of random vectors (no model), both sides."""
    from sdray.index import ShardData, build_index

    rng = np.random.default_rng(0)
    out = str(tmp_path_factory.mktemp("idx") / "index")

    def side(n, prefix):
        dense = rng.normal(size=(n, 16)).astype(np.float32)
        dense /= np.linalg.norm(dense, axis=1, keepdims=True)
        sparse = np.where(rng.random((n, 50)) < 0.2, rng.random((n, 50)) * 3, 0).astype(np.float32)
        ids = [f"{prefix}{i}" for i in range(n)]
        return ShardData(dense=dense, sparse=sparse, ids=ids, image_ids=ids, captions=[f"cap {i}" for i in ids],
                         uris=[None] * n, vocab_size=50)

    version = build_index(out, {"images": side(60, "i"), "captions": side(40, "c")}, n_shards=3,
                          vocabulary=[f"w{i}" for i in range(50)],
                          fusion={"method": "calibrated", "w1": 0.5, "w2": 0.2, "tau": 0.05})
    return out, version, rng


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_sharded_search_merges_exactly_like_the_in_process_retriever(random_index, groups):
    from sdray.index import Retriever

    out, version, rng = random_index
    retriever = Retriever.load(out)
    gs = [ShardGroup(out, g, groups) for g in range(groups)]
    for _ in range(3):
        dq = rng.normal(size=16).astype(np.float32)
        dq /= np.linalg.norm(dq)
        sq = np.where(rng.random(50) < 0.3, rng.random(50), 0).astype(np.float32)
        ids = np.flatnonzero(sq)
        for side, direction in (("images", "t2i"), ("captions", "i2t")):
            for mode in ("dense", "sparse", "hybrid"):
                for method, normalize in (("calibrated", None), ("calibrated", "zscore"),
                                          ("raw", None), ("rrf", None)):
                    fusion = Fusion(method=method, w1=0.5, w2=0.2, tau=0.05, normalize=normalize)
                    want = retriever.search(dq[None], sq[None], k=7, mode=mode, side=side, candidates=100,
                                            fusion={"method": method, "normalize": normalize},
                                            explain=3)[0]
                    parts = [p for g in gs for p in g.search(version, direction, dq, ids, sq[ids], mode, 7,
                                                             100, fusion, 3)]
                    got = merge(parts, mode, 7, fusion, 100)
                    assert [h["id"] for h in got] == [h.id for h in want], (mode, method)
                    assert np.allclose([h["score"] for h in got], [h.score for h in want], rtol=1e-5)
                    if method != "rrf" or mode != "hybrid":
                        assert [[t[0] for t in h["explanation"]] for h in got] == \
                               [[t["term_id"] for t in h.explanation] for h in want]
    found = [m for g in gs if (m := g.find(version, "images", "i5"))]
    assert len(found) == 1 and found[0]["id"] == "i5"


def test_shard_group_keeps_two_versions_and_reports_load_errors(random_index, tmp_path):
    out, version, _ = random_index
    g = ShardGroup(out, 0, 1, keep_versions=2)
    assert not g.loaded(version)
    g.load(version)
    assert g.loaded(version) and g.versions() == [version]
    with pytest.raises(Exception):
        g.load("v-does-not-exist")
    assert g.error("v-does-not-exist")
    assert g.loaded(version)


# ---------------------------------------------------------------------------- health and auth

class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *a, **kw):
        async def call():
            return self.fn(*a, **kw)
        return call()


def _fake_group(loaded: bool, error=False):
    return types.SimpleNamespace(status=_Remote(lambda v: {"loaded": loaded, "error": error, "versions": []}),
                                 prepare=_Remote(lambda v: True))


def _ingress(random_index, groups, encoder_up=True, **cfg):
    from serve.ingress import Ingress

    out, _, _ = random_index

    def ping():
        if not encoder_up:
            raise RuntimeError("replica died: secret detail")
        return True

    encoder = types.SimpleNamespace(info=_Remote(lambda uri: {"vocabulary": [], "fusion": {}, "method": None}),
                                    ping=_Remote(ping))
    cls = Ingress.func_or_class.__mro__[1]  # the class under @serve.ingress's ASGI wrapper
    return cls(ServeConfig(index=out, model="/m", poll_interval_s=0, **cfg).model_dump(), encoder, groups)


def _ready(ing):
    resp = asyncio.run(ing.readyz())
    return resp.status_code, json.loads(resp.body)


def test_readyz_is_503_until_every_shard_group_and_the_encoder_are_up(random_index):
    status, body = _ready(_ingress(random_index, [_fake_group(True), _fake_group(False)]))
    assert status == 503 and body["status"] == "loading" and "1 of 2" in body["detail"]
    status, body = _ready(_ingress(random_index, [_fake_group(True), _fake_group(False, True)]))
    assert status == 503 and body["status"] == "error"
    status, body = _ready(_ingress(random_index, [_fake_group(True), _fake_group(True)], encoder_up=False))
    assert status == 503 and "encoder down" in body["detail"] and "secret" not in json.dumps(body)
    status, body = _ready(_ingress(random_index, [_fake_group(True), _fake_group(True)]))
    assert status == 200 and body["status"] == "ok"
    assert asyncio.run(_ingress(random_index, []).livez()) == {"status": "ok"}


def test_api_keys_from_file_and_env_rate_limit_and_signed_urls(tmp_path):
    from serve.auth import KeyRing, RateLimiter, check_image_signature, parse_keys, sign_image_url

    keys = tmp_path / "keys"
    keys.write_text("# operators\nalice:alice-key-123\nbob:bob-key-4567\n")
    cfg = ServeConfig(index="/x", api_keys_file=str(keys), auth_token="legacy-token")
    ring = KeyRing.from_config(cfg, environ={"SDRAY_API_KEYS": "carol:carol-key-89"})
    assert ring.names() == ["alice", "bob", "carol", "default"]
    assert ring.identify("bob-key-4567") == "bob" and ring.identify("legacy-token") == "default"
    for wrong in (None, "", "bob-key-456", "bob-key-45678", "x" * 1000):
        with pytest.raises(ApiError) as exc:
            ring.identify(wrong)
        assert exc.value.status == 401
    assert KeyRing({}).identify(None) == "anonymous"
    for bad in ("nocolon", "a:short", "a:longenough1\na:longenough2", "bad name:longenough1"):
        with pytest.raises(ValueError):
            parse_keys(bad, "test")
    now = [0.0]
    limiter = RateLimiter(2.0, 3, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("alice")
    with pytest.raises(ApiError) as exc:
        limiter.check("alice")
    assert exc.value.status == 429 and exc.value.retry_after == pytest.approx(0.5)
    limiter.check("bob")  # buckets are per key
    now[0] = 0.5
    limiter.check("alice")  # one token back after 1/rate seconds

    # the configured rate is the deployment's: two replicas each allow half of it
    replicas = [RateLimiter(4.0, 6, clock=lambda: now[0]) for _ in range(2)]
    allowed = 0
    for step in range(400):                     # 10 s of 20 requests/s, spread evenly
        now[0] = 100 + step * 0.025
        limiter = replicas[step % 2]
        limiter.replicas = 2
        try:
            limiter.check("alice")
            allowed += 1
        except ApiError as exc:
            assert 0 < exc.retry_after <= 0.5 + 1e-9     # at most one token at 4/2 per s
    assert 4.0 * 10 <= allowed <= 4.0 * 10 + 6 + 1          # rate x time + the shared burst
    secret = ring.signing_secret()
    assert secret == KeyRing.from_config(cfg, environ={"SDRAY_API_KEYS": "carol:carol-key-89"}).signing_secret()
    q = dict(p.split("=") for p in sign_image_url(secret, "img 1", 256, 60, now=1000).split("&"))
    assert check_image_signature(secret, "img 1", 256, q["exp"], q["sig"], now=1000)
    assert not check_image_signature(secret, "img 1", 256, q["exp"], q["sig"], now=1061)  # expired
    assert not check_image_signature(secret, "img 2", 256, q["exp"], q["sig"], now=1000)
    assert not check_image_signature(secret, "img 1", 512, q["exp"], q["sig"], now=1000)
    assert not check_image_signature(b"other", "img 1", 256, q["exp"], q["sig"], now=1000)
    assert not check_image_signature(secret, "img 1", 256, "9" * 40, q["sig"], now=1000)


def test_deadline_and_failed_groups(random_index):
    from serve.ingress import DeadlineExceeded, Snapshot, Unavailable
    from serve.request import Query

    ing = _ingress(random_index, [_fake_group(True), _fake_group(True), _fake_group(True)])
    snap = Snapshot("v", {"shards": [{}] * 5}, "/m", None)
    q = Query(text="a", image=None, k=3, mode="dense")
    results = [[{"x": 1}], RuntimeError("boom"), [{"y": 2}]]
    with pytest.raises(Unavailable) as exc:
        ing._failed(results, snap, q, "search")
    assert exc.value.status == 503 and "allow_partial" in exc.value.message
    q.allow_partial = True
    failed, shards = ing._failed(results, snap, q, "search")
    assert failed == {1} and shards == 2  # shards 1 and 4 of 5 live in group 1 of 3
    with pytest.raises(Unavailable):  # nothing answered: no partial answer either
        ing._failed([RuntimeError()] * 3, snap, q, "search")

    async def slow():
        await asyncio.sleep(5)

    async def run():
        import time

        with pytest.raises(DeadlineExceeded) as exc:
            await ing._until(slow(), time.monotonic() + 0.05, "encode")
        assert exc.value.status == 504 and "encode" in exc.value.message
        with pytest.raises(DeadlineExceeded):
            await ing._fan_out([slow(), slow()], time.monotonic() + 0.05, "search")

    asyncio.run(run())


# ---------------------------------------------------------------------------- client and page

def test_query_client_formats_hits_and_reports_errors(monkeypatch, capsys):
    import argparse

    from pipelines import query

    p = argparse.ArgumentParser()
    query.add_arguments(p)
    args = p.parse_args(["--url", "http://127.0.0.1:1", "--text", "a red bus", "--k", "2", "--fusion", "rrf"])
    assert query.build_request(args) == {"k": 2, "mode": "hybrid", "text": "a red bus", "fusion": {"method": "rrf"}}
    resp = {"hits": [{"id": "x", "caption": "a red bus", "score": 1.0, "scores": {"dense": 0.5, "sparse": 3.0, "fused": 1.0},
                      "explanation": [{"term": "red", "query": 1.0, "doc": 2.0}]}],
            "direction": "t2i", "mode": "hybrid", "fusion": "rrf", "index_version": "v1", "took_ms": 3.0}
    monkeypatch.setattr(query, "post_search", lambda *a, **k: (200, resp))
    assert query.main(args) == 0
    out = capsys.readouterr().out
    assert "a red bus" in out and "red(2.00)" in out
    monkeypatch.setattr(query, "post_search", lambda *a, **k: (422, {"error": "k: must be between"}))
    assert query.main(args) == 1
    assert "HTTP 422: k: must be between" in capsys.readouterr().err


def test_page_is_plain_html_js_with_relative_urls():
    import pathlib

    static = pathlib.Path(__file__).parents[1] / "serve" / "static"
    html = (static / "index.html").read_text()
    js = (static / "app.js").read_text()
    assert 'src="static/app.js"' in html and "static/style.css" in html
    assert "http://" not in js and "https://" not in js and "import " not in js
    assert 'fetch("v1/search"' in js and "v1/images/" in js


# ---------------------------------------------------------------------------- memory and bytes

def _noise_jpeg(seed: int, side: int = 48) -> bytes:
    """A JPEG that does not compress away (random pixels): ~2-5 KB."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def counted_reads(monkeypatch):
    """Bytes every ranged read of serve/images.py returned (a list, one entry per read)."""
    from serve import images

    reads: list[int] = []
    opener = images._open_ranged

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            out = self.f.read(n)
            reads.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(images, "_open_ranged", lambda uri: Counting(opener(uri)))
    images._SHARD_CACHE.clear()
    images._FOOTERS.clear()
    return reads


def test_parquet_thumbnail_reads_one_row_group_not_the_shard(tmp_path, counted_reads):
    """The corpus reader records (row group, row); the image route then reads the footer and that
    row group's image and key columns only, returns exactly that row's image, and refuses (before
    reading) when that is more than the cap, or when the row no longer holds the sample."""
    import pyarrow.parquet as pq

    from sdray.data.formats import iter_parquet_samples, parquet_shard_bytes
    from sdray.data.skips import SkipCounts
    from serve import images
    from serve.images import ReadTooLarge, ShardChanged, read_image_bytes

    rows = [{"key": f"s{i:03d}", "image": _noise_jpeg(i), "caption": f"caption {i}"} for i in range(60)]
    data = parquet_shard_bytes(rows, row_group_size=6)          # 10 row groups
    path = tmp_path / "corpus.parquet"
    path.write_bytes(data)
    samples = list(iter_parquet_samples(io.BytesIO(data), "corpus", SkipCounts()))
    assert [s["image_loc"] for s in samples[5:8]] == ["row=0:5", "row=1:0", "row=1:1"]

    md = pq.ParquetFile(path).metadata
    for s in (samples[0], samples[37], samples[59]):
        counted_reads.clear()
        images._FOOTERS.clear()
        got = read_image_bytes(f"{path}#{s['key']}", s["image_loc"])
        assert got == rows[int(s["key"][1:])]["image"]
        group = md.row_group(int(s["image_loc"][4:].split(":")[0]))
        chunks = sum(group.column(i).total_compressed_size for i in range(group.num_columns)
                     if group.column(i).path_in_schema in ("image", "key"))
        # the footer (a 16 KiB guess, then the exact footer) + one row group's two columns
        assert sum(counted_reads) <= 16384 + md.serialized_size + 8 + chunks, counted_reads
        assert sum(counted_reads) < len(data) / 4 and chunks < len(data) / 8
    counted_reads.clear()
    assert read_image_bytes(f"{path}#s001", samples[1]["image_loc"]) == rows[1]["image"]
    assert len(counted_reads) == 1          # the footer is remembered: one read, of the row group
    with pytest.raises(ReadTooLarge) as err:
        counted_reads.clear()
        images._FOOTERS.clear()
        read_image_bytes(f"{path}#s037", samples[37]["image_loc"], max_read_bytes=md.serialized_size + 1000)
    assert err.value.needed > md.serialized_size + 1000
    assert sum(counted_reads) <= 16384 + md.serialized_size + 8  # the footer only: refused before the rows
    with pytest.raises(ShardChanged):                           # the row holds another sample
        read_image_bytes(f"{path}#s038", samples[37]["image_loc"])
    with pytest.raises(ShardChanged):
        read_image_bytes(f"{path}#s000", "row=10:0")
    with pytest.raises(ValueError):
        read_image_bytes(f"{path}#s000", "bytes=512+10")        # a tar location on a Parquet shard


def test_tar_thumbnail_reads_one_member_and_checks_its_header(tmp_path, counted_reads):
    import gzip
    import tarfile

    from sdray.data.formats import iter_tar_samples
    from sdray.data.skips import SkipCounts
    from serve.images import ShardChanged, read_image_bytes

    members = {"a.jpg": _noise_jpeg(1), "a.txt": b"first", "d/" + "x" * 120 + ".png": png(), "d/" + "x" * 120 + ".txt": b"long",
               "c.jpg": _noise_jpeg(2), "c.txt": b"third"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    samples = {s["key"]: s for s in iter_tar_samples(io.BytesIO(data), "shard", SkipCounts())}
    assert set(samples) == {"a", "c", "d/" + "x" * 120}
    for key, s in samples.items():
        counted_reads.clear()
        image = members[next(n for n in members if n.startswith(key + ".") and not n.endswith(".txt"))]
        assert read_image_bytes(f"{path}#{key}", s["image_loc"]) == image
        assert counted_reads == [512 + len(image)]              # one read: header + data
    with pytest.raises(ShardChanged):                           # another sample's member
        read_image_bytes(f"{path}#a", samples["c"]["image_loc"])
    with pytest.raises(ShardChanged):                           # not at a member boundary
        read_image_bytes(f"{path}#a", "bytes=1024+100")
    compressed = list(iter_tar_samples(io.BytesIO(gzip.compress(data)), "shard", SkipCounts()))
    assert len(compressed) == 3 and all(s["image_loc"] is None for s in compressed)


def test_an_index_without_image_locations_reads_small_shards_whole_and_refuses_large_ones(tmp_path, counted_reads):
    from sdray.data.formats import parquet_shard_bytes, tar_shard_bytes
    from serve.images import ReadTooLarge, read_image_bytes

    rows = [{"key": f"s{i}", "image": _noise_jpeg(i), "caption": "c", "ext": "jpg"} for i in range(8)]
    for name, data in (("a.parquet", parquet_shard_bytes(rows)), ("a.tar", tar_shard_bytes(rows))):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ReadTooLarge) as err:
            read_image_bytes(f"{path}#s3", None, max_read_bytes=len(data) - 1)
        assert err.value.needed == len(data) and "rebuild" in err.value.hint
        assert read_image_bytes(f"{path}#s3", None, max_read_bytes=len(data)) == rows[3]["image"]
        with pytest.raises(KeyError):
            read_image_bytes(f"{path}#missing", None)


def test_shard_group_mmap_eviction_and_memory_declaration(random_index, tmp_path):
    from sdray.index import manifest as mf
    from serve.app import group_memory

    out, version, _ = random_index
    g = ShardGroup(out, 0, 1, keep_versions=2, mmap=True)
    shard = next(iter(g.load(version).values()))["images"]
    base = shard.docs.values
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap), "CSR values are memory-mapped, not read into the process"
    g.protected = {version}
    g._versions["old-a"] = {}
    g._versions.move_to_end(version)
    g._evict(room_for=1)  # loading a third version drops the unprotected old one first
    assert g.versions() == [version]
    g._versions["newer"] = {}
    g.protected = {"newer"}
    g._evict(room_for=1)
    assert g.versions() == ["newer"]
    manifest = mf.load_manifest(out, version)
    total = sum(f["bytes"] for e in manifest["shards"] for s in e["sides"].values() for f in s["files"].values())
    mem = group_memory(manifest, 2, 1.5)
    assert len(mem) == 2 and sum(mem) == pytest.approx(total * 1.5, abs=2) and all(m > 0 for m in mem)


def test_overload_is_an_immediate_503_with_retry_after(random_index):
    ing = _ingress(random_index, [_fake_group(True)], max_inflight=2)
    ing.inflight = 2
    req = types.SimpleNamespace(state=types.SimpleNamespace(rid="r1"))

    async def never():
        raise AssertionError("an overloaded replica must not start the work")

    resp = asyncio.run(ing._guarded("/v1/search", req, never))
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert "overloaded" in json.loads(resp.body)["error"]


def test_use_gpu_gives_encoder_replicas_a_gpu_and_searchers_their_memory(monkeypatch):
    import serve.app as serve_app

    monkeypatch.setattr(serve_app, "model_uri", lambda cfg: "/m")
    monkeypatch.setattr(serve_app, "n_groups", lambda cfg: 2)
    monkeypatch.setattr(serve_app, "shard_memory", lambda cfg, groups: [1000, 3000])

    def deployments(**kw):
        from ray.serve._private.build_app import build_app as serve_build

        kw.setdefault("shards_in_ingress", False)        # auto would put 4,000 bytes of shards in the ingress
        built = serve_build(serve_app.build_app(ServeConfig(index="/x", **kw)), name="t")
        return {d.name: d for d in built.deployments}

    got = deployments(use_gpu=True, faiss_gpu=True)
    assert got["QueryEncoder"].ray_actor_options["num_gpus"] == 1.0
    assert [got[f"ShardSearcher{i}"].ray_actor_options["memory"] for i in range(2)] == [1000, 3000]
    assert got["ShardSearcher0"].max_queued_requests == 64
    assert "num_gpus" not in deployments()["QueryEncoder"].ray_actor_options
    assert "QueryEncoder" not in deployments(encoder_in_ingress=True)
    for d in got.values():  # idle OpenMP threads sleep in every replica (set before it starts)
        assert d.ray_actor_options["runtime_env"]["env_vars"] == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert "runtime_env" not in deployments(replica_env={})["Ingress"].ray_actor_options
    alone = deployments(encoder_in_ingress=True, shards_in_ingress=True)
    assert list(alone) == ["Ingress"]  # one replica does it all: no handle call per query
    assert alone["Ingress"].ray_actor_options["memory"] == 4000  # it declares every shard's memory
    assert list(deployments(shards_in_ingress=None)) == ["Ingress"]    # the default, auto, for a small index


def test_every_deployment_gets_its_queue_bound_and_backpressure_answer(monkeypatch):
    import serve.app as serve_app
    from ray.serve._private.build_app import build_app as serve_build

    monkeypatch.setattr(serve_app, "model_uri", lambda cfg: "/m")
    monkeypatch.setattr(serve_app, "n_groups", lambda cfg: 2)
    monkeypatch.setattr(serve_app, "shard_memory", lambda cfg, groups: [1000, 1000])
    knobs = {"ingress": (77, 3.0), "encoder": (55, 2.0), "shards": (33, 4.0)}
    cfg = ServeConfig(index="/x", shards_in_ingress=False, encoder_in_ingress=False, **{
        name: DeploymentKnobs(max_queued_requests=q, retry_after_s=r) for name, (q, r) in knobs.items()})
    built = {d.name: d for d in serve_build(serve_app.build_app(cfg), name="t").deployments}
    for name, knob in (("Ingress", "ingress"), ("QueryEncoder", "encoder"), ("ShardSearcher0", "shards"),
                       ("ShardSearcher1", "shards")):
        queued, retry_after = knobs[knob]
        assert built[name].max_queued_requests == queued, name
        backpressure = built[name]._deployment_config.backpressure_config
        assert (backpressure.status_code, backpressure.retry_after_s) == (503, retry_after), name
    unbounded = ServeConfig(index="/x", shards_in_ingress=True, encoder_in_ingress=True,
                            ingress=DeploymentKnobs(max_queued_requests=-1))
    alone = serve_build(serve_app.build_app(unbounded), name="t").deployments[0]
    assert alone.name == "Ingress" and alone.max_queued_requests == -1


def test_auto_placement_serves_small_indexes_from_the_ingress_alone(monkeypatch):
    import serve.app as serve_app

    def manifest(total):
        files = {"dense.faiss": {"bytes": total // 2}, "meta.parquet": {"bytes": total - total // 2}}
        return {"shards": [{"sides": {"images": {"files": files}}}]}

    def placed(total, **kw):
        monkeypatch.setattr(serve_app, "_manifest", lambda cfg: manifest(total))
        got = serve_app.resolve_placement(ServeConfig(index="/x", local_index_max_bytes=1000, **kw))
        return got.shards_in_ingress, got.encoder_in_ingress

    assert placed(1000) == (True, True)                 # at the budget: local
    assert placed(1001) == (False, False)               # over it: searcher and encoder deployments
    assert placed(10, shards_in_ingress=False) == (False, False)
    assert placed(10**9, shards_in_ingress=True) == (True, True)
    assert placed(10, encoder_in_ingress=False) == (True, False)
    assert placed(10**9, encoder_in_ingress=True) == (False, True)


def test_searcher_replica_loads_before_it_is_healthy_and_swap_waits_for_every_replica(random_index):
    from serve.searchers import ShardSearcher, all_hold

    out, version, _ = random_index
    replica = ShardSearcher.func_or_class(out, 0, 2, 0)  # the constructor loads (no board: no poll)
    assert replica.group.versions() == [version]
    replica.check_health()
    assert asyncio.run(replica.status(version))["loaded"]
    replica.group.keep_only(set())
    with pytest.raises(RuntimeError):
        replica.check_health()
    holders = {0: [["v1", "v2"], ["v1"]], 1: [["v1", "v2"]]}
    assert not all_hold(holders, 2, "v2")  # one replica of group 0 still lacks v2
    holders[0][1].append("v2")
    assert all_hold(holders, 2, "v2")
    assert not all_hold(holders, 3, "v2")  # group 2 has no live replica


def _board_here(monkeypatch):
    """A :class:`VersionBoard` in this process behind the handle calls a searcher makes."""
    import ray

    import serve.searchers as searchers

    board = searchers.VersionBoard.__ray_metadata__.modified_class()
    handle = types.SimpleNamespace(**{name: types.SimpleNamespace(remote=getattr(board, name))
                                      for name in ("report", "served", "leave")})
    monkeypatch.setattr(searchers, "get_board", lambda app_name, root: handle)
    monkeypatch.setattr(ray, "get", lambda value: value)
    return board


def _publish_copy(root, version: str, new: str) -> None:
    import shutil

    from sdray.index import manifest as mf

    shutil.copytree(f"{root}/{version}", f"{root}/{new}")
    mf.publish(str(root), new, mf.load_manifest(str(root), version))


def test_a_replica_loading_a_new_version_stays_live_so_the_swap_waits_for_it(random_index, tmp_path, monkeypatch):
    import shutil
    import threading

    from serve.searchers import ShardSearcher, all_hold
    from serve.shard_group import wait_for

    out, version, _ = random_index
    root = tmp_path / "index"
    shutil.copytree(out, root)
    board = _board_here(monkeypatch)
    replica = ShardSearcher.func_or_class(str(root), 0, 1, 0.1)   # heartbeat and poll every 0.1 s
    started, release = threading.Event(), threading.Event()
    real_load = replica.group.load

    def slow_load(v):
        if v == "v-new":
            started.set()
            release.wait(30)
        return real_load(v)

    replica.group.load = slow_load
    try:
        _publish_copy(root, version, "v-new")
        assert started.wait(10)                                   # the replica is loading v-new
        beats = board._held[(0, replica.replica)][1]
        assert wait_for(lambda: board._held[(0, replica.replica)][1] > beats, 10)   # ...and reports
        holders = board.holders(fresh_s=5.0)
        assert holders == {0: [[version]]} and not all_hold(holders, 1, "v-new")  # live, not holding
        release.set()
        assert wait_for(lambda: all_hold(board.holders(fresh_s=5.0), 1, "v-new"), 10)
    finally:
        release.set()
        replica._stop.set()


def test_a_replaced_version_stays_loaded_past_the_deadline_of_requests_pinned_to_it(random_index, tmp_path,
                                                                                     monkeypatch):
    import shutil
    import time

    import serve.app as serve_app
    from ray.serve._private.build_app import build_app as serve_build
    from serve.searchers import ShardSearcher

    out, version, _ = random_index
    cfg = ServeConfig(index="/x", request_timeout_s=30, poll_interval_s=5, swap_grace_s=3,
                      shards_in_ingress=False)
    assert cfg.retire_after_s == 30 + 2 * 5 + 3
    monkeypatch.setattr(serve_app, "model_uri", lambda c: "/m")
    monkeypatch.setattr(serve_app, "n_groups", lambda c: 1)
    monkeypatch.setattr(serve_app, "shard_memory", lambda c, groups: [1000])
    built = {d.name: d for d in serve_build(serve_app.build_app(cfg), name="t").deployments}
    assert cfg.retire_after_s in built["ShardSearcher0"].init_args      # the searchers get it

    root = tmp_path / "index"
    shutil.copytree(out, root)
    replica = ShardSearcher.func_or_class(str(root), 0, 1, 0, retire_after_s=cfg.retire_after_s)
    _publish_copy(root, version, "v-new")
    replica.group.load("v-new")
    replica._served_since = ("v-new", time.monotonic() - 31)   # a 30 s request on the old one may still run
    replica._retire("v-new")
    assert replica.group.versions() == [version, "v-new"]
    replica._served_since = ("v-new", time.monotonic() - cfg.retire_after_s - 1)
    replica._retire("v-new")
    assert replica.group.versions() == ["v-new"]
    default = ShardSearcher.func_or_class(str(root), 0, 1, 0)     # the config's default, derived
    assert default.grace_s == ServeConfig(index="/x", poll_interval_s=0).retire_after_s >= 30
