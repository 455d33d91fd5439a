"""The HTTP ingress deployment: FastAPI routes, auth, admission, deadlines, fan-out and fusion.

Routes (DESIGN.md §4): ``POST /v1/search``, ``GET /v1/images/{id}``, ``GET /v1/info``,
``GET /livez`` (the replica answers), ``GET /readyz`` and ``/healthz`` (encoder up and every shard
group has a replica holding the served version), ``GET /metrics``, the page ``/`` and ``/docs``.

Every request gets one deadline (``request_timeout_s``) for all of its steps — encoding, search,
late explanation — and a 504 past it. Overload is refused at once: beyond ``max_inflight``
requests in this replica, or when a deployment's queue is full (``max_queued_requests``), the
answer is 503 with ``Retry-After``. A shard group that fails gives 503, or with
``"allow_partial": true`` the other groups' hits and ``shards_failed``. Error bodies are fixed
phrases; exception texts only go to the log, with the request id (``X-Request-Id``).

Each request is pinned to one :class:`Snapshot` (index version, manifest, model, vocabulary,
fusion defaults) taken when it starts; a hot swap replaces the snapshot only once every live
replica of every shard group holds the new version (:mod:`serve.searchers`).
"""


import asyncio
import logging
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.auth import KeyRing, RateLimiter, bearer, check_image_signature, sign_image_url
from serve.config import ServeConfig
from serve.request import ApiError, Query, describe_validation_error, parse_request
from serve.schemas import ErrorBody, Health, SearchRequest, SearchResponse
from serve.shard_group import Fusion, current_version, merge, resolve_root
from serve.telemetry import LocalMetrics, Telemetry, background_task, request_context, request_id

log = logging.getLogger("sdray.serve")
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "application/javascript",
                "style.css": "text/css"}
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
            "form-action 'self'")


class Unavailable(ApiError):
    """503 with a Retry-After (seconds)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(503, message)
        self.retry_after = retry_after


class DeadlineExceeded(ApiError):
    def __init__(self, stage: str):
        super().__init__(504, f"the request's deadline passed during {stage}")


@dataclass(frozen=True)
class Snapshot:
    """Everything a request needs from one index version (never mixed across versions)."""

    version: str
    manifest: dict
    model_uri: str
    vocab: list[str] | None
    fusion_defaults: dict = field(default_factory=dict)

    def term(self, term_id: int) -> str:
        v = self.vocab
        return v[term_id] if v and 0 <= term_id < len(v) else str(term_id)

    def shards_of(self, group: int, groups: int) -> int:
        return sum(1 for j in range(len(self.manifest.get("shards", []))) if j % groups == group)


api = FastAPI(
    title="sdray retrieval",
    version="1",
    description="Joint sparse-dense text-image retrieval (Song et al., CIKM 2025) on Ray Serve. "
    "POST /v1/search with text (→ images) or an image (→ captions).",
)

_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 413, 415, 422, 429, 503, 504)}
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
                               "explain": {"type": "integer"}, "allow_partial": {"type": "boolean"}}}},
        },
    }
}


def error_response(status: int, message: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, int(np.ceil(retry_after))))} if retry_after is not None else None
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


class ResponseHeaders:
    """ASGI middleware: a request id in ``scope["state"]`` and ``X-Request-Id`` / ``nosniff`` on
    every response (plain ASGI, so a client that hangs up mid-request is no error)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = request_id(given)
        scope.setdefault("state", {})["rid"] = rid

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode()),
                                      (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, send_with_headers)


api.add_middleware(ResponseHeaders)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return error_response(422, describe_validation_error(exc) if hasattr(exc, "errors") else "invalid request")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        msg = f"no route {request.method} {request.url.path[:200]}"
    elif exc.status_code == 405:
        msg = f"method {request.method} not allowed on {request.url.path[:200]}"
    else:
        msg = exc.detail if isinstance(exc.detail, str) else "bad request"
    return error_response(exc.status_code, msg)


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error (request %s)", getattr(request.state, "rid", "?"))
    return error_response(500, "internal error")


def _manifest_model(root: str, version: str) -> str | None:
    from sdray.index import manifest as mf

    return mf.load_manifest(root, version).get("model")


def running_ingress_replicas() -> int:
    """Running replicas of the calling replica's deployment, from the Serve controller (one call;
    blocking). Raises outside a Serve replica."""
    ctx = serve.get_replica_context()
    app = serve.status().applications[ctx.app_name]
    return max(1, int(app.deployments[ctx.deployment].replica_states.get("RUNNING", 0)))


def _is_backpressure(err: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError

    return isinstance(err, BackPressureError) or "BackPressureError" in type(err).__name__


@serve.deployment(max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    """HTTP front: validation, auth, fan-out to the encoder and shard groups, fusion, swap."""

    def __init__(self, cfg: dict, encoder, groups: list):
        self.cfg = ServeConfig.model_validate(cfg)
        self.groups = list(groups)
        self.root, self.pinned = resolve_root(self.cfg.index)
        self.keys = KeyRing.from_config(self.cfg)
        self.limiter = RateLimiter(self.cfg.rate_limit_per_s, self.cfg.rate_burst)
        self._share_due = 0.0
        self._share_known = False
        self._share_task: asyncio.Task | None = None
        self.url_secret = self.keys.signing_secret() if self.keys.enabled else None
        self.telemetry = Telemetry()
        if encoder is None:
            from serve.shard_group import model_uri
            from serve.encoder import LocalEncoder

            encoder = LocalEncoder(model_uri(self.cfg), self.cfg.use_gpu, self.cfg.batch.max_batch_size,
                                   self.cfg.batch.torch_threads, self.telemetry)
        self.encoder = encoder
        self.local_shards = bool(self.cfg.shards_in_ingress and not self.groups)
        if self.local_shards:
            from serve.searchers import LocalSearcher

            try:
                replica = serve.get_replica_context().replica_id.unique_id
            except Exception:  # noqa: BLE001 - outside a Serve replica (unit tests)
                replica = f"local-{id(self)}"
            self.groups = [LocalSearcher(self.cfg.index, self.cfg.search_threads, self.cfg.mmap,
                                         self.cfg.shard_cache_dir, self.cfg.faiss_gpu,
                                         self.cfg.leases.model_dump(), f"{self.cfg.app_name}-ingress-{replica}")]
        self.local_encoder = not hasattr(getattr(encoder, "info", None), "remote")
        self.snapshot: Snapshot | None = None
        self.swap_pending: str | None = None
        self.metrics = LocalMetrics()
        self.inflight = 0
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._board = None
        self._retiring: asyncio.Task | None = None

    # ---- calls to the other deployments ---------------------------------------------------
    @staticmethod
    def _call(method, *args):
        """Awaitable of a deployment handle's method, or of the in-ingress encoder's coroutine."""
        return method.remote(*args) if hasattr(method, "remote") else method(*args)

    def board(self):
        """The version board of the shard-searcher deployments (None with the shards in here)."""
        if self._board is None and self.cfg.poll_interval_s > 0 and not self.local_shards:
            from serve.searchers import get_board

            self._board = get_board(self.cfg.app_name, self.root)
        return self._board

    # ---- version management ---------------------------------------------------------------
    async def _ensure_started(self) -> Snapshot:
        if self._task is None and not self.pinned and self.cfg.poll_interval_s > 0:
            self._task = background_task(self._poll())
        if self.snapshot is None:
            async with self._lock:
                if self.snapshot is None:
                    board = self.board()
                    version = await board.served.remote() if board is not None else None
                    version = version or await asyncio.to_thread(current_version, self.root, self.pinned)
                    await self._switch(version)
        return self.snapshot

    async def _snapshot(self, deadline: float) -> Snapshot:
        """The served snapshot within the request's deadline (504 past it; the load goes on for
        later requests); 503 when it cannot be loaded (storage fault, encoder down or full)."""
        if self.snapshot is not None:
            return self.snapshot
        try:
            return await asyncio.wait_for(asyncio.shield(self._ensure_started()),
                                          max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.telemetry.reject("deadline")
            raise DeadlineExceeded("loading the index") from None
        except Exception as err:  # noqa: BLE001 - the cause goes to the log, not to the client
            self.telemetry.reject("overload" if _is_backpressure(err) else "not_ready")
            log.warning("loading the served index version failed: %s", type(err).__name__, exc_info=True)
            raise Unavailable("the index or the query encoder is not ready; retry shortly",
                              self.cfg.ingress.retry_after_s) from None

    async def _switch(self, version: str) -> None:
        from sdray import storage
        from sdray.index import manifest as mf

        manifest = await asyncio.to_thread(mf.load_manifest, self.root, version)
        model_uri = self.cfg.model or manifest.get("model")
        if not model_uri:
            raise RuntimeError(f"index version {version} names no model; pass --model")
        info = await self._call(self.encoder.info, model_uri)
        vocab = None
        if manifest.get("vocab"):
            vocab = await asyncio.to_thread(storage.read_json, storage.join(self.root, version, manifest["vocab"]))
        fusion = dict(info["fusion"])
        mfusion = manifest.get("fusion") or {}
        fusion.update({k: v for k, v in mfusion.items() if k in ("method", "w1", "w2", "tau") and v is not None})
        if mfusion:  # the index's fusion is authoritative, normalisation (or none) included
            fusion["normalize"] = mfusion.get("normalize")
        if "k_rrf" in mfusion:
            fusion["rrf_k"] = mfusion["k_rrf"]
        self.snapshot = Snapshot(version, manifest, model_uri, vocab or info["vocabulary"], fusion)
        board = self.board()
        if board is not None:
            await board.serve.remote(version)
        if self.local_shards:
            self.groups[0].serve(version)
        log.info("serving index version %s (model %s)", version, model_uri)

    async def _warm_everywhere(self, version: str) -> bool:
        """True once every live replica of every shard group holds ``version`` (see serve.searchers)."""
        from serve.searchers import all_hold

        if self.local_shards:
            await self.groups[0].prepare(version)
            return True
        fresh_s = 3 * max(min(self.cfg.poll_interval_s, 2.0), 0.5)
        holders = await self.board().holders.remote(fresh_s)
        return all_hold(holders, len(self.groups), version)

    async def _retire_old(self) -> None:
        """Drop the in-ingress shards of older versions once no request pinned to one can run."""
        await asyncio.sleep(self.cfg.retire_after_s)
        await asyncio.to_thread(self.groups[0].retire)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_interval_s)
            try:
                newest = await asyncio.to_thread(current_version, self.root, None)
                if self.snapshot is None or newest == self.snapshot.version:
                    self.swap_pending = None
                    continue
                self.swap_pending = newest
                if await self._warm_everywhere(newest):
                    manifest_model = self.cfg.model or (await asyncio.to_thread(
                        _manifest_model, self.root, newest))
                    if manifest_model:
                        await self._call(self.encoder.prepare, manifest_model)
                    async with self._lock:
                        await self._switch(newest)
                    self.swap_pending = None
                    if self.local_shards:
                        self._retiring = background_task(self._retire_old())
            except Exception:  # noqa: BLE001 - keep serving the current version
                log.exception("hot swap check failed; still serving %s",
                              self.snapshot.version if self.snapshot else None)

    # ---- helpers --------------------------------------------------------------------------
    def _authorise(self, request: Request) -> str:
        name = self.keys.identify(bearer(request.headers))
        if self.keys.enabled:
            self._refresh_limiter_share()
            self.limiter.check(name)
        return name

    def _refresh_limiter_share(self) -> None:
        """Every ``rate_limit_refresh_s``, learn (in the background) how many ingress replicas
        share the rate limit; requests never wait for it."""
        now = time.monotonic()
        if not self.limiter.rate or self._share_task is not None or now < self._share_due:
            return
        self._share_due = now + self.cfg.rate_limit_refresh_s

        async def refresh():
            try:
                self.limiter.replicas = await asyncio.to_thread(running_ingress_replicas)
                self._share_known = True
            except Exception:  # noqa: BLE001 - not in a Serve replica, or the controller is busy
                log.warning("ingress replica count unavailable; rate limit shared by %d replica(s)",
                            self.limiter.replicas, exc_info=True)
            finally:
                self._share_task = None

        self._share_task = background_task(refresh())

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
            n = declared if declared and declared.isdigit() and len(declared) < 20 else f"more than {limit}"
            raise ApiError(413, f"request body of {n} bytes exceeds the {limit} byte limit")
        return b"".join(chunks)

    def _fusion(self, snap: Snapshot, q: Query) -> Fusion:
        d = dict(snap.fusion_defaults)
        for key in ("method", "w1", "w2", "rrf_k"):
            val = getattr(q.fusion, key)
            if val is not None:
                d[key] = val
        method = d.get("method", "calibrated")
        return Fusion(method=method, w1=float(d.get("w1", 1.0)), w2=float(d.get("w2", 1.0)),
                      tau=float(d.get("tau", 0.07)), rrf_k=float(d.get("rrf_k", 60.0)),
                      normalize=d.get("normalize") if method == "calibrated" else None)

    async def _until(self, awaitable, deadline: float, stage: str):
        """``awaitable`` within the request's deadline; 504 past it, 503 on a full queue."""
        left = deadline - time.monotonic()
        if left <= 0:
            self.telemetry.reject("deadline")
            raise DeadlineExceeded(stage)
        t0 = time.perf_counter()
        try:
            return await asyncio.wait_for(awaitable, left)
        except asyncio.TimeoutError:
            self.telemetry.reject("deadline")
            raise DeadlineExceeded(stage) from None
        finally:
            ms = (time.perf_counter() - t0) * 1000
            self.telemetry.stage(stage, ms)
            self.metrics.stages.labels(stage).observe(ms / 1000)

    async def _encode(self, snap: Snapshot, q: Query, deadline: float) -> dict:
        method = self.encoder.encode_text if q.text is not None else self.encoder.encode_image
        try:
            enc = await self._until(self._call(method, q.text if q.text is not None else q.image,
                                               snap.model_uri), deadline, "encode")
        except ApiError:
            raise
        except Exception as err:  # noqa: BLE001 - a full queue or a dead encoder replica
            self.telemetry.reject("overload" if _is_backpressure(err) else "encoder_failure")
            log.warning("encoder call failed: %s", type(err).__name__)
            raise Unavailable("the query encoder is overloaded or unavailable; retry shortly",
                              self.cfg.encoder.retry_after_s) from None
        if "error" in enc:
            if enc["error"].startswith("image"):
                raise ApiError(422, enc["error"])
            raise Unavailable("the query encoder failed on this query; retry shortly")
        return enc

    async def _fan_out(self, calls: list, deadline: float, stage: str) -> list:
        """Results per call, exceptions in place (a failed group does not cancel the others)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(stage)
        tasks = [asyncio.ensure_future(c) for c in calls]
        t0 = time.perf_counter()
        done, pending = await asyncio.wait(tasks, timeout=left)
        ms = (time.perf_counter() - t0) * 1000
        self.telemetry.stage(stage, ms)
        self.metrics.stages.labels(stage).observe(ms / 1000)
        for t in pending:
            t.cancel()
        if pending:
            self.telemetry.reject("deadline")
            raise DeadlineExceeded(stage)
        return [t.exception() or t.result() for t in tasks]

    def _failed(self, results: list, snap: Snapshot, q: Query, what: str) -> tuple[set[int], int]:
        """Groups whose call failed and their shard count; 503 unless the query allows partial."""
        failed = {g for g, r in enumerate(results) if isinstance(r, BaseException)}
        if not failed:
            return failed, 0
        for g in failed:
            log.warning("shard group %d failed during %s: %s", g, what, type(results[g]).__name__)
        self.telemetry.reject("shard_failure")
        if not q.allow_partial or len(failed) == len(results):
            raise Unavailable(f"{len(failed)} of {len(results)} shard groups failed during {what}; "
                              "retry shortly, or send \"allow_partial\": true",
                              self.cfg.shards.retry_after_s)
        return failed, sum(snap.shards_of(g, len(self.groups)) for g in failed)

    async def _search(self, q: Query, deadline: float) -> dict:
        t0 = time.perf_counter()
        snap = await self._snapshot(deadline)
        enc = await self._encode(snap, q, deadline)
        t_enc = time.perf_counter()
        self.metrics.batch.labels("text" if q.text is not None else "image").observe(enc["batch_size"])
        fusion = self._fusion(snap, q)
        candidates = self.cfg.candidates or int(snap.manifest.get("config", {}).get("candidates", 100))
        linear = q.mode != "hybrid" or not fusion.per_query()
        results = await self._fan_out([
            self._call(g.search, snap.version, q.direction, enc["dense"], enc["sparse_ids"], enc["sparse_vals"],
                            q.mode, q.k, candidates, fusion.__dict__, q.explain if linear else 0)
            for g in self.groups], deadline, "search")
        failed, shards_failed = self._failed(results, snap, q, "search")
        t_search = time.perf_counter()
        parts = [p for g, nested in enumerate(results) if g not in failed for p in nested]
        hits = merge(parts, q.mode, q.k, fusion, candidates)
        if not linear and q.explain and hits:
            shards_failed += await self._explain_late(hits, q, snap, enc, deadline)
        self.telemetry.stage("fuse", (time.perf_counter() - t_search) * 1000)
        self.metrics.searches.labels(q.mode, q.direction).inc()
        return self._response(snap, q, enc, fusion, hits, shards_failed,
                              {"encode_ms": (t_enc - t0) * 1000, "search_ms": (t_search - t_enc) * 1000,
                               "batch_size": int(enc["batch_size"])}, t0)

    def _response(self, snap: Snapshot, q: Query, enc: dict, fusion: Fusion, hits: list[dict],
                  shards_failed: int, timings: dict, t0: float) -> dict:
        qterms = []
        if len(enc["sparse_ids"]):
            order = np.argsort(-enc["sparse_vals"], kind="stable")[:12]
            qterms = [{"term": snap.term(int(enc["sparse_ids"][i])), "weight": float(enc["sparse_vals"][i])}
                      for i in order]
        out_hits = []
        for h in hits:
            image = h["id"] if q.direction == "t2i" else h["image_id"]
            out_hits.append({
                "id": h["id"], "image_id": h["image_id"], "caption": h["caption"],
                "score": h["score"], "shard": h["shard"],
                "scores": {"dense": h["dense"], "sparse": h["sparse"], "fused": h["fused"]},
                "explanation": [{"term": snap.term(t), "query": qw, "doc": dw} for t, qw, dw in h["explanation"]],
                "thumbnail": self._thumbnail_url(image) if image else None,
            })
        return {"hits": out_hits, "mode": q.mode, "fusion": fusion.method if q.mode == "hybrid" else None,
                "direction": q.direction, "k": q.k, "index_version": snap.version, "query_terms": qterms,
                "shards_failed": shards_failed, "took_ms": (time.perf_counter() - t0) * 1000,
                "timings": timings}

    def _thumbnail_url(self, image_id: str, size: int = 256) -> str:
        base = f"v1/images/{urllib.parse.quote(str(image_id), safe='')}"
        if self.url_secret is None:
            return f"{base}?size={size}"
        return f"{base}?{sign_image_url(self.url_secret, str(image_id), size, self.cfg.image_url_ttl_s)}"

    async def _explain_late(self, hits: list[dict], q: Query, snap: Snapshot, enc: dict,
                            deadline: float) -> int:
        """RRF: explanations for the final hits only (one call per group holding some).

        Returns the shards whose explanation failed (their hits keep an empty explanation)."""
        n = len(self.groups)
        by_group: dict[int, list[int]] = {}
        for i, h in enumerate(hits):
            by_group.setdefault(h["shard"] % n, []).append(i)
        order = list(by_group.items())
        results = await self._fan_out([
            self._call(self.groups[g].explain, snap.version, q.direction,
                                          [(hits[i]["shard"], hits[i]["row"]) for i in idx],
                                          enc["sparse_ids"], enc["sparse_vals"], q.explain)
            for g, idx in order], deadline, "explain")
        failed = [g for (g, _), r in zip(order, results) if isinstance(r, BaseException)]
        if failed:
            self._failed([r if isinstance(r, BaseException) else None for r in results], snap, q, "explain")
        for (g, idx), expl in zip(order, results):
            if isinstance(expl, BaseException):
                continue
            for i, e in zip(idx, expl):
                hits[i]["explanation"] = e
        return sum(snap.shards_of(g, n) for g in failed)

    async def _guarded(self, route: str, request: Request, fn) -> Response:
        """:meth:`_answer` with the request's id on every log line emitted meanwhile (the
        ``sdray.serve`` logger's :class:`~serve.telemetry.RequestIdFilter`)."""
        with request_context(getattr(request.state, "rid", None)):
            return await self._answer(route, fn)

    async def _answer(self, route: str, fn) -> Response:
        """Admission, error mapping, metrics and the log line of a failed request around ``fn``."""
        t0 = time.perf_counter()
        if self.inflight >= self.cfg.max_inflight:
            self.telemetry.reject("overload")
            resp = error_response(503, "overloaded: too many requests in progress; retry shortly",
                                  self.cfg.ingress.retry_after_s)
        else:
            self.inflight += 1
            try:
                resp = await fn()
            except ApiError as err:
                if err.status == 429:
                    self.telemetry.reject("rate_limit")
                resp = error_response(err.status, err.message, getattr(err, "retry_after", None))
            except Exception:  # noqa: BLE001 - never let a request take the replica down
                log.exception("request failed")
                resp = error_response(500, "internal error")
            finally:
                self.inflight -= 1
        seconds = time.perf_counter() - t0
        self.telemetry.request(route, resp.status_code, seconds)
        self.metrics.requests.labels(route, str(resp.status_code)).inc()
        self.metrics.latency.labels(route).observe(seconds)
        if resp.status_code >= 500:
            log.warning("%s -> %d in %.1f ms", route, resp.status_code, seconds * 1000)
        return resp

    async def _readiness(self) -> tuple[bool, dict]:
        """``(ready, body)``: encoder answers and every group holds the served version."""
        try:
            snap = await asyncio.wait_for(self._ensure_started(), 5.0)
        except Exception:  # noqa: BLE001 - not ready; the cause is logged, not returned
            log.warning("readiness: index or encoder not ready", exc_info=True)
            return False, {"status": "loading", "detail": "index or encoder not ready"}
        n_shards = len(snap.manifest.get("shards", []))
        try:
            checks = [self._call(g.status, snap.version) for g in self.groups]
            if not self.local_encoder:
                checks.append(self.encoder.ping.remote())
            states = await asyncio.wait_for(asyncio.gather(*checks, return_exceptions=True), 3.0)
        except asyncio.TimeoutError:
            states = [TimeoutError()] * (len(self.groups) + 1)
        groups = states[: len(self.groups)]
        encoder_ok = self.local_encoder or states[-1] is True
        ready = [s for s in groups if isinstance(s, dict) and s.get("loaded")]
        errors = [s for s in groups if isinstance(s, dict) and s.get("error")]
        body = {"index_version": snap.version, "shards": n_shards,
                "shards_ready": n_shards if len(ready) == len(self.groups) else None}
        if len(ready) == len(self.groups) and encoder_ok:
            return True, body | {"status": "ok", "detail": f"swapping to {self.swap_pending}"
                                 if self.swap_pending else None}
        detail = f"{len(ready)} of {len(self.groups)} shard groups ready" + ("" if encoder_ok else "; encoder down")
        return False, body | {"status": "error" if errors else "loading", "detail": detail}

    # ---- routes ---------------------------------------------------------------------------
    @api.post("/v1/search", response_model=SearchResponse, responses=_ERRORS, openapi_extra=_SEARCH_BODY,
              summary="Text → images or image → captions; dense, sparse or hybrid")
    async def search(self, request: Request):
        async def run():
            deadline = time.monotonic() + self.cfg.request_timeout_s
            self._authorise(request)
            body = await self._read_body(request)
            t0 = time.perf_counter()
            q = await asyncio.to_thread(parse_request, body, request.headers.get("content-type"), self.cfg)
            self.telemetry.stage("parse", (time.perf_counter() - t0) * 1000)
            return JSONResponse(await self._search(q, deadline))

        return await self._guarded("/v1/search", request, run)

    @api.get("/v1/images/{doc_id}", responses={200: {"content": {"image/jpeg": {}}}, **_ERRORS},
             summary="Thumbnail (JPEG) of an indexed image: a signed URL from a hit, or with a key")
    async def image(self, doc_id: str, request: Request, size: int = 256, exp: str | None = None,
                    sig: str | None = None):
        async def run():
            deadline = time.monotonic() + self.cfg.request_timeout_s
            if self.url_secret is not None and not check_image_signature(self.url_secret, doc_id, size, exp, sig):
                self._authorise(request)
            if not 16 <= size <= 1024:
                raise ApiError(422, "size: must be between 16 and 1024")
            if len(doc_id) > 512:
                raise ApiError(422, "image id too long")
            snap = await self._snapshot(deadline)
            key = f"{snap.version}/{doc_id}/{size}"
            data = self._thumbs.get(key)
            if data is None:
                data = await self._thumbnail(snap, doc_id, size, deadline)
                if isinstance(data, Response):      # a redirect to the source url
                    return data
                self._thumbs[key] = data
                while len(self._thumbs) > 512:
                    self._thumbs.popitem(last=False)
            return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=600"})

        return await self._guarded("/v1/images", request, run)

    async def _find(self, snap: Snapshot, doc_id: str, deadline: float) -> dict | None:
        """Metadata of the document ``doc_id`` (an image first, else a caption) from the group that
        holds it; None when no group does. 503 when a group that failed may hold it."""
        for side in ("images", "captions"):
            found = await self._fan_out([self._call(g.find, snap.version, side, doc_id) for g in self.groups],
                                        deadline, "find")
            meta = next((m for m in found if isinstance(m, dict)), None)
            if meta is not None:
                return meta
            failed = [g for g, m in enumerate(found) if isinstance(m, BaseException)]
            if failed:
                for g in failed:
                    log.warning("shard group %d failed during find: %s", g, type(found[g]).__name__)
                self.telemetry.reject("shard_failure")
                raise Unavailable(f"{len(failed)} of {len(found)} shard groups failed looking up the image; "
                                  "retry shortly", self.cfg.shards.retry_after_s)
        return None

    async def _thumbnail(self, snap: Snapshot, doc_id: str, size: int, deadline: float) -> bytes | Response:
        """JPEG bytes, or a 307 to the document's source url when its stored bytes cannot be read
        within ``image_read_max_bytes``."""
        from serve.images import ReadTooLarge, read_image_bytes, thumbnail

        meta = await self._find(snap, doc_id, deadline)
        if meta is None or not meta.get("uri"):
            raise ApiError(404, f"no image with id {doc_id[:80]!r} in index version {snap.version}")
        try:
            raw = await asyncio.to_thread(read_image_bytes, meta["uri"], meta.get("image_loc"),
                                          self.cfg.image_read_max_bytes)
            return await asyncio.to_thread(thumbnail, raw, size)
        except ReadTooLarge as err:
            url = meta.get("url") or ""
            log.info("image %r: %s", doc_id[:80], err)
            if urllib.parse.urlsplit(url).scheme in ("http", "https"):
                return RedirectResponse(url, status_code=307, headers={"Cache-Control": "private, max-age=600"})
            raise ApiError(404, f"image {doc_id[:80]!r} is indexed but reading it takes {err.needed} bytes "
                                f"({err.what}), more than image_read_max_bytes ({err.cap}), and it has no "
                                f"source url{'; ' + err.hint if err.hint else ''}") from None
        except (KeyError, FileNotFoundError, ValueError):
            log.warning("image %r: stored bytes unavailable", doc_id[:80], exc_info=True)
            raise ApiError(404, f"image {doc_id[:80]!r} is indexed but its bytes are unavailable") from None
        except OSError:     # the store failed past its retries: not a missing image
            log.warning("image %r: storage fault", doc_id[:80], exc_info=True)
            raise Unavailable("image storage is unavailable; retry shortly",
                              self.cfg.ingress.retry_after_s) from None

    @api.get("/v1/info", summary="Index version, model, sides, counts, fusion defaults and limits")
    async def info(self, request: Request):
        async def run():
            self._authorise(request)
            snap = await self._snapshot(time.monotonic() + self.cfg.request_timeout_s)
            m = snap.manifest
            return JSONResponse({
                "index_version": snap.version, "model": snap.model_uri,
                "sides": m.get("sides"), "shards": len(m.get("shards", [])),
                "groups": len(self.groups), "fusion": snap.fusion_defaults,
                "limits": {"k_max": self.cfg.k_max, "k_default": self.cfg.k_default,
                           "max_text_chars": self.cfg.max_text_chars,
                           "max_image_bytes": self.cfg.max_image_bytes,
                           "max_image_pixels": self.cfg.max_image_pixels,
                           "request_timeout_s": self.cfg.request_timeout_s},
                "modes": ["dense", "sparse", "hybrid"], "fusions": ["raw", "calibrated", "rrf"],
                "default_mode": self.cfg.default_mode, "auth": self.keys.enabled,
                "rate_limit": {"per_s": self.cfg.rate_limit_per_s, "burst": self.cfg.rate_burst,
                               "ingress_replicas": self.limiter.replicas if self._share_known else None}
                if self.limiter.rate else None,
                "swap_pending": self.swap_pending,
            })

        return await self._guarded("/v1/info", request, run)

    @api.get("/livez", summary="200 while this ingress replica answers (liveness probe)")
    async def livez(self):
        return {"status": "ok"}

    @api.get("/readyz", response_model=Health, responses={503: {"model": Health}},
             summary="200 when the encoder is up and every shard group holds the served version")
    async def readyz(self):
        ready, body = await self._readiness()
        return JSONResponse(status_code=200 if ready else 503, content=body,
                            headers=None if ready else {"Retry-After": "2"})

    @api.get("/healthz", response_model=Health, responses={503: {"model": Health}},
             summary="200 once every shard (and the encoder) is loaded, 503 before (= /readyz)")
    async def healthz(self):
        return await self.readyz()

    @api.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics of this replica")
    async def metrics_route(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                            headers={"Content-Security-Policy": PAGE_CSP, "Referrer-Policy": "no-referrer"})

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str):
        if name not in STATIC_FILES:
            return error_response(404, "no such static file")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name],
                        headers={"Content-Security-Policy": PAGE_CSP})

