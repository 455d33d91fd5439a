"""The Ray Serve application: FastAPI ingress → batched query encoder → shard searchers → fusion.

Deployments (DESIGN.md §2, §4), one module each::

    Ingress            serve/ingress.py    FastAPI routes, auth, admission, deadlines, fusion, swap
    QueryEncoder       serve/encoder.py    backbone + heads, @serve.batch (or inside the ingress:
                                           ServeConfig.encoder_in_ingress)
    ShardSearcher<i>   serve/searchers.py  shard group i (shards j with j % groups == i), loaded
                                           before the replica takes traffic; reports to a board
                                           (or every shard inside the ingress replica:
                                           ServeConfig.shards_in_ingress, no handle calls)

By default (:func:`resolve_placement`) an index of at most ``local_index_max_bytes`` is served by
the ingress alone (encoder and shards inside it), a larger one by all three kinds.

Entry points: :func:`build_app` (an application builder: ``import_path: serve.app:build_app`` in a
Serve config YAML, ``args`` = :class:`~serve.config.ServeConfig` fields) and :func:`deploy` (what
``sdray serve`` and the tests call).
"""

from __future__ import annotations

import os
import time

from ray import serve

from serve.config import ServeConfig
from serve.encoder import QueryEncoder
from serve.ingress import Ingress
from serve.searchers import ShardSearcher
from serve.shard_group import model_uri, served_manifest as _manifest



def n_groups(cfg: ServeConfig) -> int:
    """Shard-searcher deployments: ``cfg.shard_groups`` or the served version's shard count."""
    return cfg.shard_groups or max(1, len(_manifest(cfg)["shards"]))


def group_memory(manifest: dict, groups: int, per_byte: float) -> list[int]:
    """Bytes to declare to Ray per shard-group replica: ``per_byte`` × its shard files' sizes."""
    out = [0] * groups
    for j, entry in enumerate(manifest.get("shards", [])):
        for side in (entry.get("sides") or {}).values():
            out[j % groups] += sum(int(f.get("bytes", 0)) for f in (side.get("files") or {}).values())
    return [int(b * per_byte) for b in out]


def shard_memory(cfg: ServeConfig, groups: int) -> list[int]:
    """Memory to declare per shard-group replica, from the served version's manifest."""
    return group_memory(_manifest(cfg), groups, cfg.memory_per_shard_byte)


def resolve_placement(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with ``shards_in_ingress`` and ``encoder_in_ingress`` decided (``None`` = auto).

    Auto: the ``local`` placement (encoder and every shard inside the ingress replica) when the
    served version's shard files total at most ``local_index_max_bytes``, else ``deployment``
    (a QueryEncoder and ShardSearcher deployments). At demo scale the local placement met the
    overhead targets the deployment placement missed (``benchmarks/serve_load.py``,
    docs/benchmarks.md). An explicit value of either knob is kept.
    """
    shards = cfg.shards_in_ingress
    if shards is None:
        shards = sum(shard_memory(cfg.model_copy(update={"memory_per_shard_byte": 1.0}), 1)) <= cfg.local_index_max_bytes
    encoder = shards if cfg.encoder_in_ingress is None else cfg.encoder_in_ingress
    return cfg.model_copy(update={"shards_in_ingress": shards, "encoder_in_ingress": encoder})


def build_app(args: dict | ServeConfig):
    """Application builder (``import_path: serve.app:build_app``); ``args``: ServeConfig fields."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(dict(args or {}))
    cfg = resolve_placement(cfg)
    encoder = None
    if not cfg.encoder_in_ingress:
        knobs = cfg.encoder
        if cfg.use_gpu and not knobs.num_gpus:
            knobs = knobs.model_copy(update={"num_gpus": 1.0})
        encoder = QueryEncoder.options(**knobs.options(cfg.replica_env),
                                       user_config=cfg.batch.model_dump()).bind(model_uri(cfg), cfg.use_gpu)
    if cfg.shards_in_ingress:  # the ingress replica loads and searches every shard itself
        knobs = cfg.ingress
        if knobs.memory_bytes is None:
            knobs = knobs.model_copy(update={"memory_bytes": sum(shard_memory(cfg, 1)) or None})
        return Ingress.options(**knobs.options(cfg.replica_env)).bind(cfg.model_dump(), encoder, [])
    groups = n_groups(cfg)
    memory = shard_memory(cfg, groups)
    searchers = []
    for i in range(groups):
        knobs = cfg.shards
        if knobs.memory_bytes is None and memory[i]:
            knobs = knobs.model_copy(update={"memory_bytes": memory[i]})
        searchers.append(ShardSearcher.options(name=f"ShardSearcher{i}", **knobs.options(cfg.replica_env)).bind(
            cfg.index, i, groups, cfg.poll_interval_s, cfg.app_name, cfg.search_threads, cfg.mmap,
            cfg.shard_cache_dir, cfg.faiss_gpu, cfg.leases.model_dump(), cfg.retire_after_s))
    return Ingress.options(**cfg.ingress.options(cfg.replica_env)).bind(cfg.model_dump(), encoder, searchers)


def deploy(cfg: ServeConfig, wait_s: float = 300.0, blocking_health: bool = True) -> str:
    """Start Serve on ``cfg.host:cfg.port`` (Ray must be initialised) and run the app.

    Returns the base URL; with ``blocking_health`` waits until ``/readyz`` answers 200.
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
                with urllib.request.urlopen(f"{url}/readyz", timeout=10) as r:
                    if r.status == 200:
                        return url
            except Exception as err:  # noqa: BLE001 - not up yet; reported on timeout
                last = err
            time.sleep(0.5)
        raise TimeoutError(f"{url}/readyz not ready after {wait_s:.0f}s ({last})")
    return url


def ray_env() -> None:
    """Environment Ray needs here; call before ``ray.init``."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
