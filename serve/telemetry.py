"""Metrics and request ids of the Serve app.

Every replica records into Ray's metrics (:mod:`ray.util.metrics`), which each node's metrics agent
exports on Ray's Prometheus endpoint with one series per replica (tags ``ReplicaId``,
``Deployment``…), so a Prometheus scrape of the cluster aggregates every replica:

==========================================  ===========  ===========================================
name                                        kind         tags
==========================================  ===========  ===========================================
``sdray_http_requests``                     counter      route, status
``sdray_http_latency_ms``                   histogram    route
``sdray_stage_latency_ms``                  histogram    stage (parse, encode, search, explain, fuse,
                                                         find)
``sdray_encoder_batch_size``                histogram    kind (text, image)
``sdray_rejected_requests``                 counter      reason (overload, rate_limit, deadline,
                                                         shard_failure, encoder_failure, not_ready)
==========================================  ===========  ===========================================

The ingress also keeps the same request counters and latency in a replica-local Prometheus
registry for ``GET /metrics`` (one replica's view, handy on one machine). Request ids: the ingress
takes ``X-Request-Id`` from the client (bounded, printable) or makes one and returns it as a
response header; while it serves the request, :data:`REQUEST_ID` holds it (it follows the request
into worker threads, ``asyncio.to_thread`` copies the context) and :class:`RequestIdFilter` puts
it on every line of the ``sdray.serve`` logger: ``[request <id>] …`` and ``record.request_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import uuid

log = logging.getLogger("sdray.serve")
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("sdray_request_id", default=None)

LATENCY_MS = [1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]
_REQUEST_ID_FORMAT = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_id(given: str | None) -> str:
    """The client's ``X-Request-Id`` when it is short and printable, else a new random id."""
    if given and _REQUEST_ID_FORMAT.match(given):
        return given
    return uuid.uuid4().hex[:16]


class RequestIdFilter(logging.Filter):
    """Marks a record logged while a request is served with its id (``request_id``, ``-``
    outside one) and prefixes its message with ``[request <id>]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        if not hasattr(record, "request_id"):
            record.request_id = rid or "-"
            if rid:
                record.msg = f"[request {rid}] {record.msg}"
        return True


log.addFilter(RequestIdFilter())


@contextlib.contextmanager
def request_context(rid: str | None):
    """:data:`REQUEST_ID` is ``rid`` inside the ``with`` block (the request's handling)."""
    token = REQUEST_ID.set(rid)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


def background_task(coro) -> asyncio.Task:
    """``coro`` as a task outside the current request's context (its log lines carry no id)."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class Telemetry:
    """Ray metrics of one replica (created inside the replica; no-ops outside Ray)."""

    def __init__(self):
        from ray.util import metrics as rm

        self.requests = rm.Counter("sdray_http_requests", "HTTP requests answered",
                                   tag_keys=("route", "status"))
        self.latency = rm.Histogram("sdray_http_latency_ms", "Request latency (ms)",
                                    boundaries=LATENCY_MS, tag_keys=("route",))
        self.stages = rm.Histogram("sdray_stage_latency_ms", "Latency of one stage of a search (ms)",
                                   boundaries=LATENCY_MS, tag_keys=("stage",))
        self.batches = rm.Histogram("sdray_encoder_batch_size", "Query encoder batch sizes",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("kind",))
        self.rejected = rm.Counter("sdray_rejected_requests", "Requests refused or cut short",
                                   tag_keys=("reason",))

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds * 1000, tags={"route": route})

    def stage(self, name: str, ms: float) -> None:
        self.stages.observe(ms, tags={"stage": name})

    def batch(self, n: int, kind: str) -> None:
        self.batches.observe(n, tags={"kind": kind})

    def reject(self, reason: str) -> None:
        self.rejected.inc(tags={"reason": reason})


class LocalMetrics:
    """Replica-local Prometheus registry behind ``GET /metrics``."""

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
        self.stages = Histogram("sdray_stage_latency_seconds", "Latency of one stage of a search",
                                ["stage"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5),
                                registry=self.registry)
