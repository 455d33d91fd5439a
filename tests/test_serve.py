"""The deployed Serve app end to end (one deployment for the whole module, on 127.0.0.1):
the HTTP contract of DESIGN.md §4, 4xx errors, auth, thumbnails, metrics, the search page in
headless Chromium, the `sdray query` client and a hot swap to a newly published index version."""

import base64
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow

TOKEN = "test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_ctx(request):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        request.getfixturevalue("ray_session")
        yield
        return
    except pytest.FixtureLookupError:
        pass
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def app(ray_ctx, tmp_path_factory):
    from ray import serve

    from serve.app import deploy
    from serve.config import BatchKnobs, DeploymentKnobs, ServeConfig
    from serve.testing import build_demo_index

    work = str(tmp_path_factory.mktemp("serve"))
    demo = build_demo_index(work, n_images=12, shards=2)
    cfg = ServeConfig(index=demo.index, port=_free_port(), auth_token=TOKEN, poll_interval_s=0.5,
                      swap_grace_s=0.2, k_max=20, batch=BatchKnobs(batch_wait_timeout_s=0.005),
                      shards_in_ingress=False,   # every deployment and hop (auto would pick local here)
                      rate_limit_per_s=1000.0, rate_limit_refresh_s=1.0,
                      ingress=DeploymentKnobs(min_replicas=2, max_replicas=2, max_ongoing_requests=128))
    url = deploy(cfg, wait_s=240)
    yield url, demo, work
    serve.shutdown()


def call(url, path, body=None, token=TOKEN, ctype="application/json", method=None, headers=False):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"))
    if data is not None:
        req.add_header("Content-Type", ctype)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw, status, hdrs = r.read(), r.status, r.headers
    except urllib.error.HTTPError as err:
        raw, status, hdrs = err.read(), err.code, err.headers
    out = json.loads(raw) if "json" in hdrs.get("content-type", "") else raw
    return (status, out, hdrs) if headers else (status, out)


def corpus_image(demo) -> bytes:
    from serve.images import read_image_bytes

    return read_image_bytes(f"{demo.corpus}#000000_0")


def test_text_query_returns_images_with_scores_and_explanations(app):
    url, demo, _ = app
    for mode in ("hybrid", "dense", "sparse"):
        status, body = call(url, "/v1/search", {"text": "a red circle on a striped background", "k": 5, "mode": mode})
        assert status == 200, body
        assert body["direction"] == "t2i" and body["mode"] == mode and len(body["hits"]) == 5
        for hit in body["hits"]:
            assert hit["id"] in demo.image_ids and hit["image_id"] == hit["id"] and hit["caption"]
            assert set(hit["scores"]) == {"dense", "sparse", "fused"}
            assert hit["score"] == pytest.approx(hit["scores"]["fused" if mode == "hybrid" else mode])
            assert hit["explanation"], "every hit explains its sparse match"
            for term in hit["explanation"]:
                assert isinstance(term["term"], str) and term["query"] > 0 and term["doc"] > 0
            contrib = [t["query"] * t["doc"] for t in hit["explanation"]]
            assert contrib == sorted(contrib, reverse=True)
        scores = [h["score"] for h in body["hits"]]
        assert scores == sorted(scores, reverse=True)
    status, body = call(url, "/v1/search", {"text": "a red circle", "k": 4, "fusion": {"method": "rrf"}})
    assert status == 200 and body["fusion"] == "rrf" and len(body["hits"]) == 4
    assert all(h["explanation"] for h in body["hits"])


def test_serve_matches_the_in_process_retriever(app):
    from sdray.index import Retriever
    from sdray.model import RetrievalModel

    url, demo, _ = app
    model, retriever = RetrievalModel.load(demo.model), Retriever.load(demo.index)
    enc = model.encode_texts(["two small blue squares"])
    want = retriever.search(enc.dense, enc.sparse, k=6, mode="hybrid", side="images")[0]
    status, body = call(url, "/v1/search", {"text": "two small blue squares", "k": 6})
    assert status == 200
    assert [h["id"] for h in body["hits"]] == [h.id for h in want]


def test_image_query_returns_captions_base64_and_multipart(app):
    url, demo, _ = app
    img = corpus_image(demo)
    status, body = call(url, "/v1/search", {"image": base64.b64encode(img).decode(), "k": 3, "mode": "dense"})
    assert status == 200, body
    assert body["direction"] == "i2t" and len(body["hits"]) == 3
    assert all(h["caption"] in demo.captions and h["image_id"] in demo.image_ids for h in body["hits"])
    boundary = "sdrayboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n2\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"mode\"\r\n\r\ndense\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + img + f"\r\n--{boundary}--\r\n".encode()
    status, body2 = call(url, "/v1/search", form, ctype=f"multipart/form-data; boundary={boundary}")
    assert status == 200, body2
    assert [h["id"] for h in body2["hits"]] == [h["id"] for h in body["hits"]][:2]


@pytest.mark.parametrize("body,status,words", [
    (b"{oops", 400, "not valid JSON"),
    ({"text": 12}, 422, "text"),
    ({"text": ""}, 422, "empty"),
    ({"text": "a", "image": "aGk="}, 422, "not both"),
    ({"k": 3}, 422, "give one of text"),
    ({"text": "a", "k": 21}, 422, "between 1 and 20"),
    ({"text": "a", "mode": "psychic"}, 422, "unknown mode"),
    ({"image": base64.b64encode(b"GIF89a broken").decode()}, 422, "cannot be decoded"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (b'{"text": {"a":' * 5_000 + b"1" + b"}" * 5_001, 400, "nested too deeply"),
    (b'{"text": "a", "k": ' + b"7" * 5_000 + b"}", 400, "number too large"),
])
def test_bad_requests_get_4xx_json_errors(app, body, status, words):
    url, _, _ = app
    got, resp = call(url, "/v1/search", body)
    assert got == status and words in resp["error"]


def test_auth_limits_routes_and_replica_survives(app):
    url, _, _ = app
    deadline = time.monotonic() + 30          # each ingress replica learns it has one sibling
    seen = set()
    while time.monotonic() < deadline and seen != {2}:
        seen |= {call(url, "/v1/info")[1]["rate_limit"]["ingress_replicas"]} - {None}
        time.sleep(0.2)
    assert seen == {2}, seen                  # so each allows half the configured rate
    status, body = call(url, "/v1/search", {"text": "a"}, token=None)
    assert status == 401 and "API key" in body["error"]
    assert call(url, "/v1/search", {"text": "a"}, token="wrong")[0] == 401
    huge = json.dumps({"image": "A" * (12 * 1024 * 1024)}).encode()
    status, body = call(url, "/v1/search", huge)
    assert status == 413 and "limit" in body["error"]
    status, body = call(url, "/v1/nothing")
    assert status == 404 and "error" in body
    assert call(url, "/v1/search", method="GET")[0] == 405
    assert call(url, "/v1/search", {"text": "still alive", "k": 1})[0] == 200


def test_health_openapi_metrics_and_thumbnails(app):
    url, demo, _ = app
    status, body = call(url, "/healthz", token=None)
    assert status == 200 and body["status"] == "ok" and body["shards"] == 2
    assert call(url, "/readyz", token=None)[1]["shards_ready"] == 2
    assert call(url, "/livez", token=None) == (200, {"status": "ok"})
    status, page, hdrs = call(url, "/", token=None, headers=True)
    assert status == 200 and "default-src 'self'" in hdrs["Content-Security-Policy"]
    assert hdrs["X-Content-Type-Options"] == "nosniff"
    status, spec = call(url, "/openapi.json", token=None)
    assert status == 200 and "/v1/search" in spec["paths"] and "/healthz" in spec["paths"]
    status, text = call(url, "/metrics", token=None)
    text = text.decode()
    assert status == 200 and "sdray_requests_total" in text and "sdray_request_latency_seconds" in text
    assert "sdray_encoder_batch_size" in text
    status, jpeg = call(url, f"/v1/images/{demo.image_ids[0]}?size=64")
    assert status == 200 and jpeg[:2] == b"\xff\xd8"
    assert call(url, f"/v1/images/{demo.image_ids[0]}?token={TOKEN}", token=None)[0] == 401  # no key in URLs
    status, body, hdrs = call(url, "/v1/search", {"text": "a red circle", "k": 2}, headers=True)
    assert len(hdrs["X-Request-Id"]) >= 8
    signed = body["hits"][0]["thumbnail"]
    assert TOKEN not in signed and "sig=" in signed
    status, jpeg = call(url, "/" + signed, token=None)  # what an <img src> fetches: no key
    assert status == 200 and jpeg[:2] == b"\xff\xd8"
    assert call(url, "/" + signed.replace("size=256", "size=1024"), token=None)[0] == 401
    assert call(url, "/v1/images/no-such-image")[0] == 404


def test_query_cli_against_the_endpoint(app, capsys):
    import argparse

    from pipelines import query

    url, _, _ = app
    p = argparse.ArgumentParser()
    query.add_arguments(p)
    assert query.main(p.parse_args(["--url", url, "--text", "a green star", "--k", "3", "--token", TOKEN,
                                    "--json"])) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["hits"]) == 3
    assert query.main(p.parse_args(["--url", url, "--text", "x", "--k", "999", "--token", TOKEN])) == 1
    assert "between 1 and 20" in capsys.readouterr().err


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None
    return path


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium and the playwright package")
def test_search_page_shows_results_in_a_real_browser(app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, demo, _ = app
    img_path = tmp_path / "query.jpg"
    img_path.write_bytes(corpus_image(demo))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("#token", state="visible", timeout=20_000)  # auth is on: asks for it
            page.fill("#token", TOKEN)
            page.fill("#query", "a red circle")
            page.click("#go")
            page.wait_for_selector("#results .hit", timeout=30_000)
            hits = page.locator("#results .hit")
            assert hits.count() == 12
            first = hits.first
            assert first.get_attribute("data-id") in demo.image_ids
            assert "dense" in first.inner_text() and "sparse" in first.inner_text()
            assert first.locator(".term").count() > 0
            thumb = first.locator("img")  # thumbnails load through /v1/images
            deadline = time.time() + 20
            while thumb.evaluate("img => img.naturalWidth") == 0 and time.time() < deadline:
                time.sleep(0.2)  # polled from Python: a string predicate would need the eval CSP forbids
            assert thumb.evaluate("img => img.naturalWidth") > 0
            page.check("input[name=mode][value=sparse]")
            # locator waits, not string predicates: the page's CSP forbids eval, Playwright's too
            expect(page.locator("#status")).to_contain_text("sparse", timeout=20_000)
            page.set_input_files("#file", str(img_path))  # image query -> captions
            expect(page.locator("#status")).to_contain_text("i2t", timeout=30_000)
            caption = page.locator("#results .hit .caption").first.inner_text()
            assert caption in demo.captions
            assert not errors, errors
        finally:
            browser.close()


SWAP_SETTLE_S = 8.0   # a generous bound on the gap between two ingress replicas' switches


def test_hot_swap_to_a_new_version_fails_no_request(app):
    from serve.testing import build_demo_index

    url, demo, work = app
    old_version = demo.version
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            status, body = call(url, "/v1/search", {"text": "a yellow triangle", "k": 3})
            results.append((status, body.get("index_version") if isinstance(body, dict) else None))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        new = build_demo_index(work, n_images=6, shards=3, start=500, model_uri=demo.model)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(v == new.version for _, v in results[-4:]):
            time.sleep(0.2)
        # the two ingress replicas each switch on their own poll (0.5 s here), so for a moment
        # one may answer from the new version and the other from the old; after that settles,
        # every answer comes from the new one
        time.sleep(SWAP_SETTLE_S)
        settled = len(results)
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert new.version != old_version
    assert results and all(s == 200 for s, _ in results), [r for r in results if r[0] != 200][:3]
    assert {v for _, v in results} <= {old_version, new.version}
    after = [v for _, v in results[settled:]]
    assert after and set(after) == {new.version}, after
    status, body = call(url, "/v1/search", {"text": "a yellow triangle", "k": 20})
    assert status == 200 and {h["id"] for h in body["hits"]} == set(new.image_ids)
    assert call(url, "/healthz", token=None)[1]["shards"] == 3


def test_gc_keeps_the_version_replicas_still_serve_after_a_rollback(app):
    """Runs after the hot swap. Publish a third version and roll back to the first at once: the
    replicas still serve the second, which is neither current nor the newest; gc keeps it
    (leased), and deletes it once the replicas have swapped back and dropped it."""
    from sdray.index import leases as ls
    from sdray.index import versions as ver
    from serve.testing import build_demo_index

    url, demo, work = app
    root = demo.index
    served = call(url, "/v1/search", {"text": "a red circle", "k": 1})[1]["index_version"]
    assert served != demo.version
    holders = sorted(x.holder for x in ls.read_leases(root)[served])
    assert [h.split("-")[1] for h in holders] == ["group0", "group1"]   # one replica per shard group
    newest = build_demo_index(work, n_images=6, shards=2, start=900, model_uri=demo.model).version
    ver.rollback(root, demo.version)
    no_grace = ls.LeaseConfig(min_age_s=0)
    result = ver.gc(root, 1, config=no_grace)             # keeps newest (keep=1) and current anyway
    assert result.deleted == [] and "leased by" in result.kept[served], result
    deadline = time.monotonic() + 120                      # swap back, then the replicas' grace
    while time.monotonic() < deadline and served in ls.read_leases(root):
        time.sleep(0.5)
    assert served not in ls.read_leases(root)
    assert ver.gc(root, 1, config=no_grace).deleted == [served]
    assert {v.version for v in ver.list_versions(root)} == {demo.version, newest}
    while time.monotonic() < deadline:
        status, body = call(url, "/v1/search", {"text": "a red circle", "k": 3})
        assert status == 200 and len(body["hits"]) == 3
        if body["index_version"] == demo.version:
            break
        time.sleep(0.5)
    assert body["index_version"] == demo.version
