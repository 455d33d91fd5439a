"""The Ray Serve application: FastAPI ingress → batched query encoder → shard searchers → fusion.

Deployments (DESIGN.md §2, §4)::

    Ingress            FastAPI: /v1/search, /v1/images/{id}, /v1/info, /healthz, /metrics, /, /docs
                       validates requests (serve.request), fuses shard results (serve.searcher.merge),
                       polls the index's version pointer and hot-swaps versions; autoscaled
    QueryEncoder       backbone + heads; @serve.batch for captions and for images; autoscaled
    ShardSearcher<i>   shards j with j % groups == i of every version in use, loaded from object
                       storage; replicas per shard configurable

Entry points: :func:`build_app` (an application builder: ``import_path: serve.app:build_app`` in a
Serve config YAML, ``args`` = :class:`~serve.config.ServeConfig` fields) and :func:`deploy` (what
``sdray serve`` and the tests call).

Hot swap: every ingress replica reads ``CURRENT.json`` every ``poll_interval_s``. On a new version
it waits ``swap_grace_s`` (searchers poll too and preload it), asks each searcher group to load
it (and the encoder to load the version's model if it changed), then switches. Each request is
answered from one version end to end; searchers keep the previous version loaded, so requests in
flight during a swap finish normally.
"""

import asyncio
import hmac
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.config import ServeConfig
from serve.request import ApiError, Query, describe_validation_error, parse_request
from serve.schemas import ErrorBody, Health, SearchRequest, SearchResponse
from serve.searcher import SIDE_FOR, Fusion, ShardGroup, current_version, merge, resolve_root

log = logging.getLogger("sdray.serve")
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "application/javascript",
                "style.css": "text/css"}


# ----------------------------------------------------------------------------- query encoder

class _Models:
    """Models by URI, loaded once each (thread-safe), the newest ``keep`` kept."""

    def __init__(self, keep: int = 2):
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.keep = keep

    def get(self, uri: str):
        m = self._models.get(uri)
        if m is not None:
            return m
        with self._lock:
            m = self._models.get(uri)
            if m is None:
                from sdray.model import RetrievalModel

                m = RetrievalModel.load(uri)
                _ = m.backbone, m.preprocessor  # load the frozen towers now, not on a request
                self._models[uri] = m
                while len(self._models) > self.keep:
                    self._models.popitem(last=False)
            return m


def _rows(enc) -> list[dict]:
    dense = enc.dense.detach().cpu().numpy().astype(np.float32)
    sparse = enc.sparse.detach().cpu().numpy()
    out = []
    for i in range(len(dense)):
        ids = np.flatnonzero(sparse[i]).astype(np.int32)
        out.append({"dense": dense[i], "sparse_ids": ids,
                    "sparse_vals": sparse[i][ids].astype(np.float32)})
    return out


def encode_batch(models: _Models, kind: str, items: list, uris: list[str]) -> list[dict]:
    """Encode a mixed batch (grouped by model URI); failures come back per item as ``error``."""
    from sdray.data.decode import decode_image

    out: list[dict | None] = [None] * len(items)
    for uri in dict.fromkeys(uris):
        idx = [i for i, u in enumerate(uris) if u == uri]
        try:
            model = models.get(uri)
            if kind == "text":
                rows = _rows(model.encode_texts([items[i] for i in idx]))
            else:
                images, ok = [], []
                for i in idx:
                    im, reason = decode_image(items[i], 1 << 40)
                    if im is None:
                        out[i] = {"error": f"image cannot be decoded ({reason})"}
                    else:
                        images.append(im)
                        ok.append(i)
                idx = ok
                rows = _rows(model.encode_images(images)) if images else []
            for i, row in zip(idx, rows):
                out[i] = row | {"batch_size": len(items)}
        except Exception as err:  # noqa: BLE001 - reported to the caller, never crashes the replica
            log.exception("encoding failed")
            for i in idx:
                out[i] = {"error": f"encoder failed: {type(err).__name__}: {err}"}
    return out


@serve.deployment(max_ongoing_requests=64)
class QueryEncoder:
    """Backbone + heads; batches concurrent queries (``@serve.batch``, settings via user_config)."""

    def __init__(self, model_uri: str):
        self.models = _Models()
        self.default_uri = model_uri
        self.models.get(model_uri)
        try:
            from ray.serve.metrics import Histogram

            self._batch_hist = Histogram("sdray_encoder_batch_size", "Query encoder batch sizes",
                                         boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("kind",))
        except Exception:  # noqa: BLE001
            self._batch_hist = None

    def reconfigure(self, cfg: dict) -> None:
        torch.set_num_threads(int(cfg.get("torch_threads") or os.cpu_count() or 1))
        for method in (self.encode_text, self.encode_image):
            if "max_batch_size" in cfg:
                method.set_max_batch_size(int(cfg["max_batch_size"]))
            if "batch_wait_timeout_s" in cfg:
                method.set_batch_wait_timeout_s(float(cfg["batch_wait_timeout_s"]))

    def _observe(self, kind: str, n: int) -> None:
        if self._batch_hist is not None:
            try:
                self._batch_hist.observe(n, tags={"kind": kind})
            except Exception:  # noqa: BLE001
                pass

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def encode_text(self, texts: list[str], uris: list[str]) -> list[dict]:
        self._observe("text", len(texts))
        return await asyncio.to_thread(encode_batch, self.models, "text", texts, uris)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def encode_image(self, images: list[bytes], uris: list[str]) -> list[dict]:
        self._observe("image", len(images))
        return await asyncio.to_thread(encode_batch, self.models, "image", images, uris)

    async def prepare(self, uri: str) -> bool:
        await asyncio.to_thread(self.models.get, uri)
        return True

    async def info(self, uri: str) -> dict:
        """Vocabulary and the model's own fusion defaults (method, w1, w2, tau, rrf_k)."""
        model = await asyncio.to_thread(self.models.get, uri)
        w1, w2 = model.config.fusion_weights()
        return {"vocabulary": list(model.vocabulary),
                "fusion": {"method": model.config.fusion.method, "w1": w1, "w2": w2,
                           "tau": model.tau, "rrf_k": model.config.fusion.rrf_k,
                           "normalize": model.config.fusion.normalize},
                "method": model.meta.get("method")}


# ----------------------------------------------------------------------------- shard searchers

@serve.deployment(max_ongoing_requests=64)
class ShardSearcher:
    """Hosts shard group ``group`` of ``groups``; loads the current version in the background."""

    def __init__(self, index: str, group: int, groups: int, poll_interval_s: float = 5.0):
        self.root, self.pinned = resolve_root(index)
        self.group = ShardGroup(self.root, group, groups)
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="shard-poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                v = current_version(self.root, self.pinned)
                if not self.group.loaded(v) and self.group.error(v) is None:
                    self.group.load(v)
            except Exception as err:  # noqa: BLE001 - retried on the next poll
                log.warning("shard group %s: %s", self.group.group, err)
            if self.pinned or self.poll_interval_s <= 0:
                # still retry until the pinned/first version is loaded
                if self.group.versions():
                    return
                self._stop.wait(1.0)
            else:
                self._stop.wait(self.poll_interval_s)

    async def status(self, version: str) -> dict:
        return {"loaded": self.group.loaded(version), "error": self.group.error(version),
                "versions": self.group.versions()}

    async def prepare(self, version: str) -> bool:
        await asyncio.to_thread(self.group.load, version)
        return True

    async def search(self, version: str, direction: str, dense, sparse_ids, sparse_vals, mode: str,
                     k: int, candidates: int, fusion: dict, explain: int) -> list[dict]:
        return await asyncio.to_thread(self.group.search, version, direction, dense, sparse_ids,
                                       sparse_vals, mode, k, candidates, Fusion(**fusion), explain)

    async def explain(self, version: str, direction: str, items: list[tuple[int, int]], sparse_ids,
                      sparse_vals, top: int) -> list[list]:
        return await asyncio.to_thread(self.group.explain, version, direction, items, sparse_ids,
                                       sparse_vals, top)

    async def find(self, version: str, side: str, doc_id: str) -> dict | None:
        return await asyncio.to_thread(self.group.find, version, side, doc_id)

    def __del__(self):
        self._stop.set()


# ----------------------------------------------------------------------------- ingress

api = FastAPI(
    title="sdray retrieval",
    version="1",
    description="Joint sparse-dense text-image retrieval (Song et al., CIKM 2025) on Ray Serve. "
    "POST /v1/search with text (→ images) or an image (→ captions).",
)

_ERRORS = {400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 413: {"model": ErrorBody},
           415: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}}
_SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SearchRequest.model_json_schema(
                ref_template="#/components/schemas/{model}")},
            "multipart/form-data": {"schema": {
                "type": "object",
                "properties": {"text": {"type": "string"}, "image": {"type": "string", "format": "binary"},
                               "k": {"type": "integer"}, "mode": {"type": "string"},
                               "fusion.method": {"type": "string"}, "fusion.w1": {"type": "number"},
                               "fusion.w2": {"type": "number"}, "fusion.rrf_k": {"type": "number"},
                               "explain": {"type": "integer"}}}},
        },
    }
}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return _error(422, describe_validation_error(exc) if hasattr(exc, "errors") else str(exc))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and msg == "Not Found":
        msg = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        msg = f"method {request.method} not allowed on {request.url.path}"
    return _error(exc.status_code, msg)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error")
    return _error(500, f"internal error: {type(exc).__name__}")


class _Metrics:
    """Prometheus metrics of one ingress replica (``GET /metrics``), mirrored to Ray's metrics."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("sdray_requests_total", "HTTP requests", ["route", "status"],
                                registry=self.registry)
        self.searches = Counter("sdray_searches_total", "Searches answered", ["mode", "direction"],
                                registry=self.registry)
        self.latency = Histogram("sdray_request_latency_seconds", "Request latency", ["route"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch = Histogram("sdray_encoder_batch_size", "Query encoder batch size seen per query",
                               ["kind"], buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.ray = None
        try:
            from ray.serve import metrics as rm

            self.ray = {
                "requests": rm.Counter("sdray_http_requests", "HTTP requests", tag_keys=("route", "status")),
                "latency": rm.Histogram("sdray_http_latency_ms", "Request latency (ms)",
                                        boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000],
                                        tag_keys=("route",)),
            }
        except Exception:  # noqa: BLE001
            self.ray = None

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if self.ray:
            try:
                self.ray["requests"].inc(tags={"route": route, "status": str(status)})
                self.ray["latency"].observe(seconds * 1000, tags={"route": route})
            except Exception:  # noqa: BLE001
                pass


@serve.deployment(max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    """HTTP front: validation, auth, fan-out to the encoder and shard groups, fusion, swap."""

    def __init__(self, cfg: dict, encoder, groups: list):
        self.cfg = ServeConfig.model_validate(cfg)
        self.encoder = encoder
        self.groups = list(groups)
        self.root, self.pinned = resolve_root(self.cfg.index)
        self.version: str | None = None
        self.manifest: dict | None = None
        self.model_uri: str | None = None
        self.vocab: list[str] | None = None
        self.fusion_defaults: dict = {}
        self.swap_error: str | None = None
        self.metrics = _Metrics()
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # ---- version management ---------------------------------------------------------------
    async def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll())
        if self.version is None:
            async with self._lock:
                if self.version is None:
                    await self._switch(await asyncio.to_thread(current_version, self.root, self.pinned),
                                       wait_groups=False)

    async def _switch(self, version: str, wait_groups: bool = True) -> None:
        from sdray.index import manifest as mf

        manifest = await asyncio.to_thread(mf.load_manifest, self.root, version)
        model_uri = self.cfg.model or manifest.get("model")
        if not model_uri:
            raise RuntimeError(f"index version {version} names no model; pass --model")
        if wait_groups:
            await asyncio.gather(*(g.prepare.remote(version) for g in self.groups))
        info = await self.encoder.info.remote(model_uri) if model_uri != self.model_uri else None
        vocab = None
        if manifest.get("vocab"):
            from sdray import storage

            try:
                vocab = await asyncio.to_thread(
                    storage.read_json, storage.join(self.root, version, manifest["vocab"]))
            except Exception:  # noqa: BLE001 - fall back to the model's vocabulary
                vocab = None
        if info is not None:
            self.fusion_defaults = dict(info["fusion"])
            self.vocab = vocab or info["vocabulary"]
        elif vocab:
            self.vocab = vocab
        mfusion = manifest.get("fusion") or {}
        self.fusion_defaults.update({k: v for k, v in mfusion.items()
                                     if k in ("method", "w1", "w2", "tau") and v is not None})
        if mfusion:  # the index's fusion is authoritative, normalisation (or none) included
            self.fusion_defaults["normalize"] = mfusion.get("normalize")
        if "k_rrf" in mfusion:
            self.fusion_defaults["rrf_k"] = mfusion["k_rrf"]
        self.manifest, self.model_uri, self.version = manifest, model_uri, version
        self.swap_error = None
        log.info("serving index version %s (model %s)", version, model_uri)

    async def _poll(self) -> None:
        if self.pinned or self.cfg.poll_interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self.cfg.poll_interval_s)
            try:
                v = await asyncio.to_thread(current_version, self.root, None)
                if self.version is not None and v != self.version:
                    await asyncio.sleep(self.cfg.swap_grace_s)
                    async with self._lock:
                        await self._switch(v)
            except Exception as err:  # noqa: BLE001 - keep serving the old version
                self.swap_error = f"{type(err).__name__}: {err}"
                log.warning("hot swap failed, still serving %s: %s", self.version, err)

    # ---- helpers --------------------------------------------------------------------------
    def _check_auth(self, request: Request, allow_query: bool = False) -> None:
        token = self.cfg.auth_token
        if not token:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else None
        if given is None and allow_query:
            given = request.query_params.get("token")
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.body_limit
        declared = request.headers.get("content-length")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                chunks = []
                # drain (a bounded amount) so the client gets the 413 instead of a reset connection
                if size > 4 * limit:
                    break
                continue
            chunks.append(chunk)
        if size > limit:
            n = declared if declared and declared.isdigit() else f"more than {limit}"
            raise ApiError(413, f"request body of {n} bytes exceeds the {limit} byte limit")
        return b"".join(chunks)

    def _fusion(self, q: Query) -> Fusion:
        d = dict(self.fusion_defaults)
        f = q.fusion
        for key in ("method", "w1", "w2", "rrf_k"):
            val = getattr(f, key)
            if val is not None:
                d[key] = val
        method = d.get("method", "calibrated")
        return Fusion(method=method, w1=float(d.get("w1", 1.0)),
                      w2=float(d.get("w2", 1.0)), tau=float(d.get("tau", 0.07)),
                      rrf_k=float(d.get("rrf_k", 60.0)),
                      normalize=d.get("normalize") if method == "calibrated" else None)

    def _term(self, term_id: int) -> str:
        v = self.vocab
        return v[term_id] if v and 0 <= term_id < len(v) else str(term_id)

    async def _search(self, q: Query) -> dict:
        t0 = time.perf_counter()
        await self._ensure_started()
        version, model_uri = self.version, self.model_uri
        timeout = self.cfg.request_timeout_s
        if q.text is not None:
            enc = await asyncio.wait_for(self.encoder.encode_text.remote(q.text, model_uri), timeout)
        else:
            enc = await asyncio.wait_for(self.encoder.encode_image.remote(q.image, model_uri), timeout)
        if "error" in enc:
            if enc["error"].startswith("image"):
                raise ApiError(422, enc["error"])
            raise RuntimeError(enc["error"])
        t_enc = time.perf_counter()
        self.metrics.batch.labels("text" if q.text is not None else "image").observe(enc["batch_size"])
        fusion = self._fusion(q)
        candidates = self.cfg.candidates or int((self.manifest or {}).get("config", {}).get("candidates", 100))
        linear = q.mode != "hybrid" or not fusion.per_query()
        parts_nested = await asyncio.wait_for(asyncio.gather(*(
            g.search.remote(version, q.direction, enc["dense"], enc["sparse_ids"], enc["sparse_vals"],
                            q.mode, q.k, candidates, fusion.__dict__, q.explain if linear else 0)
            for g in self.groups)), timeout)
        t_search = time.perf_counter()
        parts = [p for nested in parts_nested for p in nested]
        hits = merge(parts, q.mode, q.k, fusion, candidates)
        if not linear and q.explain and hits:
            await self._explain_late(hits, q, version, enc)
        qterms = []
        if len(enc["sparse_ids"]):
            order = np.argsort(-enc["sparse_vals"], kind="stable")[:12]
            qterms = [{"term": self._term(int(enc["sparse_ids"][i])), "weight": float(enc["sparse_vals"][i])}
                      for i in order]
        out_hits = []
        for h in hits:
            out_hits.append({
                "id": h["id"], "image_id": h["image_id"], "caption": h["caption"],
                "score": h["score"], "shard": h["shard"],
                "scores": {"dense": h["dense"], "sparse": h["sparse"], "fused": h["fused"]},
                "explanation": [{"term": self._term(t), "query": qw, "doc": dw}
                                for t, qw, dw in h["explanation"]],
            })
        self.metrics.searches.labels(q.mode, q.direction).inc()
        return {"hits": out_hits, "mode": q.mode, "fusion": fusion.method if q.mode == "hybrid" else None,
                "direction": q.direction, "k": q.k, "index_version": version, "query_terms": qterms,
                "took_ms": (time.perf_counter() - t0) * 1000,
                "timings": {"encode_ms": (t_enc - t0) * 1000, "search_ms": (t_search - t_enc) * 1000,
                            "batch_size": int(enc["batch_size"])}}

    async def _explain_late(self, hits: list[dict], q: Query, version: str, enc: dict) -> None:
        """RRF: explanations for the final hits only (one call per group holding some)."""
        n = len(self.groups)
        by_group: dict[int, list[int]] = {}
        for i, h in enumerate(hits):
            by_group.setdefault(h["shard"] % n, []).append(i)
        results = await asyncio.gather(*(
            self.groups[g].explain.remote(version, q.direction, [(hits[i]["shard"], hits[i]["row"]) for i in idx],
                                          enc["sparse_ids"], enc["sparse_vals"], q.explain)
            for g, idx in by_group.items()))
        for (g, idx), expl in zip(by_group.items(), results):
            for i, e in zip(idx, expl):
                hits[i]["explanation"] = e

    async def _timed(self, route: str, fn) -> Response:
        t0 = time.perf_counter()
        try:
            resp = await fn()
        except ApiError as err:
            resp = _error(err.status, err.message)
        except asyncio.TimeoutError:
            resp = _error(503, "timed out waiting for the encoder or shard searchers")
        except Exception as err:  # noqa: BLE001 - never let a request take the replica down
            log.exception("request failed")
            resp = _error(500, f"internal error: {type(err).__name__}: {err}")
        self.metrics.observe(route, resp.status_code, time.perf_counter() - t0)
        return resp

    # ---- routes ---------------------------------------------------------------------------
    @api.post("/v1/search", response_model=SearchResponse, responses=_ERRORS, openapi_extra=_SEARCH_BODY,
              summary="Text → images or image → captions; dense, sparse or hybrid")
    async def search(self, request: Request):
        async def run():
            self._check_auth(request)
            body = await self._read_body(request)
            q = await asyncio.to_thread(parse_request, body, request.headers.get("content-type"), self.cfg)
            return JSONResponse(await self._search(q))

        return await self._timed("/v1/search", run)

    @api.get("/v1/images/{doc_id}", responses={200: {"content": {"image/jpeg": {}}}, **_ERRORS},
             summary="Thumbnail (JPEG) of an indexed image, by image id")
    async def image(self, doc_id: str, request: Request, size: int = 256):
        async def run():
            self._check_auth(request, allow_query=True)
            if not 16 <= size <= 1024:
                raise ApiError(422, "size: must be between 16 and 1024")
            if len(doc_id) > 512:
                raise ApiError(422, "image id too long")
            await self._ensure_started()
            version = self.version
            key = f"{version}/{doc_id}/{size}"
            data = self._thumbs.get(key)
            if data is None:
                found = await asyncio.gather(*(g.find.remote(version, "images", doc_id) for g in self.groups))
                meta = next((m for m in found if m), None)
                if meta is None:
                    found = await asyncio.gather(*(g.find.remote(version, "captions", doc_id) for g in self.groups))
                    meta = next((m for m in found if m), None)
                if meta is None or not meta.get("uri"):
                    raise ApiError(404, f"no image with id {doc_id!r} in index version {version}")
                from serve.images import read_image_bytes, thumbnail

                try:
                    raw = await asyncio.to_thread(read_image_bytes, meta["uri"])
                    data = await asyncio.to_thread(thumbnail, raw, size)
                except (KeyError, FileNotFoundError, ValueError) as err:
                    raise ApiError(404, f"image {doc_id!r} is indexed but its bytes are unavailable: {err}")
                self._thumbs[key] = data
                while len(self._thumbs) > 512:
                    self._thumbs.popitem(last=False)
            return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

        return await self._timed("/v1/images", run)

    @api.get("/v1/info", summary="Index version, model, sides, counts, fusion defaults and limits")
    async def info(self, request: Request):
        async def run():
            self._check_auth(request)
            await self._ensure_started()
            m = self.manifest or {}
            return JSONResponse({
                "index_version": self.version, "model": self.model_uri,
                "sides": m.get("sides"), "shards": len(m.get("shards", [])),
                "groups": len(self.groups), "fusion": self.fusion_defaults,
                "limits": {"k_max": self.cfg.k_max, "k_default": self.cfg.k_default,
                           "max_text_chars": self.cfg.max_text_chars,
                           "max_image_bytes": self.cfg.max_image_bytes,
                           "max_image_pixels": self.cfg.max_image_pixels},
                "modes": ["dense", "sparse", "hybrid"], "fusions": ["raw", "calibrated", "rrf"],
                "default_mode": self.cfg.default_mode, "auth": bool(self.cfg.auth_token),
                "swap_error": self.swap_error,
            })

        return await self._timed("/v1/info", run)

    @api.get("/healthz", response_model=Health, responses={503: {"model": Health}},
             summary="200 once every shard (and the encoder) is loaded, 503 before")
    async def healthz(self):
        try:
            await asyncio.wait_for(self._ensure_started(), 5.0)
        except Exception as err:  # noqa: BLE001
            return JSONResponse(status_code=503, content={"status": "loading", "detail": f"{type(err).__name__}: {err}"})
        version = self.version
        try:
            states = await asyncio.wait_for(
                asyncio.gather(*(g.status.remote(version) for g in self.groups)), 3.0)
        except Exception:  # noqa: BLE001
            states = None
        n_shards = len((self.manifest or {}).get("shards", []))
        if states is None or not all(s["loaded"] for s in states):
            errors = [s["error"] for s in states or [] if s.get("error")]
            ready = sum(1 for s in states or [] if s["loaded"])
            return JSONResponse(status_code=503, content={
                "status": "error" if errors else "loading", "index_version": version,
                "shards": n_shards, "shards_ready": None,
                "detail": "; ".join(errors) or f"{ready} of {len(self.groups)} shard groups loaded"})
        return {"status": "ok", "index_version": version, "shards": n_shards, "shards_ready": n_shards,
                "detail": self.swap_error}

    @api.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics of this replica")
    async def metrics(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str):
        if name not in STATIC_FILES:
            return _error(404, f"no static file {name!r}")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name])


# ----------------------------------------------------------------------------- building

def n_groups(cfg: ServeConfig) -> int:
    """Shard-searcher deployments: ``cfg.shard_groups`` or the served version's shard count."""
    if cfg.shard_groups:
        return cfg.shard_groups
    from sdray.index import manifest as mf

    root, pinned = resolve_root(cfg.index)
    return max(1, len(mf.load_manifest(root, pinned)["shards"]))


def model_uri(cfg: ServeConfig) -> str:
    if cfg.model:
        return cfg.model
    from sdray.index import manifest as mf

    root, pinned = resolve_root(cfg.index)
    uri = mf.load_manifest(root, pinned).get("model")
    if not uri:
        raise ValueError(f"the index at {cfg.index} names no model; pass --model")
    return uri


def build_app(args: dict | ServeConfig):
    """Application builder (``import_path: serve.app:build_app``); ``args``: ServeConfig fields."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(dict(args or {}))
    groups = n_groups(cfg)
    encoder = QueryEncoder.options(
        **cfg.encoder.options(), user_config=cfg.batch.model_dump()).bind(model_uri(cfg))
    searchers = [
        ShardSearcher.options(name=f"ShardSearcher{i}", **cfg.shards.options()).bind(
            cfg.index, i, groups, cfg.poll_interval_s)
        for i in range(groups)
    ]
    return Ingress.options(**cfg.ingress.options()).bind(cfg.model_dump(), encoder, searchers)


def deploy(cfg: ServeConfig, wait_s: float = 300.0, blocking_health: bool = True) -> str:
    """Start Serve on ``cfg.host:cfg.port`` (Ray must be initialised) and run the app.

    Returns the base URL; with ``blocking_health`` waits until ``/healthz`` answers 200.
    """
    import urllib.request

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    if blocking_health:
        end = time.monotonic() + wait_s
        last = None
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
                    if r.status == 200:
                        return url
            except Exception as err:  # noqa: BLE001
                last = err
            time.sleep(0.5)
        raise TimeoutError(f"{url}/healthz not ready after {wait_s:.0f}s ({last})")
    return url


def ray_env() -> None:
    """Environment Ray needs here; call before ``ray.init``."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
