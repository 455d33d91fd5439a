"""``sdray serve``: deploy the Ray Serve retrieval app (serve/app.py) for an index and keep it up.

    sdray serve --index URI [--model URI] [--host 127.0.0.1] [--port 8000] [--config serve.yaml]
                [--replicas-per-shard N] [--encoder-max-replicas N] [--auth-token T] [--k-max K]
                [--api-keys-file F] [--rate-limit R] [--placement auto|local|deployment]
                [--encoder-in-ingress] [--shards-in-ingress] [--use-gpu] [--faiss-gpu]

``--config`` reads :class:`serve.config.ServeConfig` fields from YAML/JSON (flags override it).
Starts a local Ray (or joins ``RAY_ADDRESS``), waits for ``/readyz`` and prints the URL, then
serves until Ctrl-C / SIGTERM, when it shuts Serve down. ``--no-block`` returns once healthy
(the app keeps running only while this Ray instance does — use ``serve deploy serve/config.yaml``
for a detached deployment on a cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index URI (root with CURRENT.json, or a version)")
    parser.add_argument("--model", default=None, help="model URI (default: the index manifest's)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--config", default=None, help="YAML/JSON file of ServeConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="ServeConfig override with a dotted key and a YAML value, e.g. "
                             "--set encoder.max_replicas=4 (repeatable; applied after the flags)")
    parser.add_argument("--replicas-per-shard", type=int, default=None,
                        help="replicas of each shard searcher (default: the config's)")
    parser.add_argument("--shard-groups", type=int, default=None,
                        help="shard-searcher deployments (default: one per shard)")
    parser.add_argument("--encoder-min-replicas", type=int, default=None,
                        help="query-encoder replicas kept up (autoscaling floor)")
    parser.add_argument("--encoder-max-replicas", type=int, default=None,
                        help="query-encoder autoscaling ceiling")
    parser.add_argument("--ingress-max-replicas", type=int, default=None,
                        help="HTTP ingress autoscaling ceiling")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="queries the encoder batches together")
    parser.add_argument("--batch-wait-s", type=float, default=None,
                        help="seconds the encoder waits to fill a batch")
    parser.add_argument("--k-max", type=int, default=None, help="largest k a request may ask for")
    parser.add_argument("--auth-token", default=os.environ.get("SDRAY_AUTH_TOKEN"),
                        help="require 'Authorization: Bearer TOKEN' on /v1/* (env SDRAY_AUTH_TOKEN)")
    parser.add_argument("--api-keys-file", default=None,
                        help="file of 'name:key' lines; any key opens /v1/* (also $SDRAY_API_KEYS)")
    parser.add_argument("--rate-limit", type=float, default=None,
                        help="requests/s per API key across the whole deployment (429 beyond)")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="one deadline per request across encode, search and explain (504 past it)")
    parser.add_argument("--placement", choices=("auto", "local", "deployment"), default=None,
                        help="local: the encoder and every shard inside the ingress replica; "
                             "deployment: a query-encoder and shard-searcher deployments; auto "
                             "(default): local for an index of at most local_index_max_bytes")
    parser.add_argument("--encoder-in-ingress", action="store_true",
                        help="encode queries inside the ingress replica (one hop fewer; small deployments)")
    parser.add_argument("--shards-in-ingress", action="store_true",
                        help="search every shard inside the ingress replica (no shard-searcher "
                             "deployments, no handle call per query; indexes that fit one replica)")
    parser.add_argument("--use-gpu", action="store_true",
                        help="encoder replicas reserve one GPU and encode on CUDA")
    parser.add_argument("--faiss-gpu", action="store_true",
                        help="shard searchers move dense FAISS indexes to the GPU (faiss GPU build)")
    parser.add_argument("--poll-interval", type=float, default=None,
                        help="seconds between checks for a newly published index version (0: never)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /readyz")
    parser.add_argument("--no-block", action="store_true", help="return once healthy")
    parser.add_argument("--json", action="store_true", help="print {url, index_version} as JSON")


def config_from_args(args: argparse.Namespace):
    import yaml

    from serve.config import ServeConfig

    data: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if "applications" in data:  # a Serve config YAML: take the app's args
            data = dict(data["applications"][0].get("args") or {})
    data.update({"index": args.index, "host": args.host, "port": args.port})
    if args.model:
        data["model"] = args.model
    if args.auth_token:
        data["auth_token"] = args.auth_token
    for flag, key in (("k_max", "k_max"), ("shard_groups", "shard_groups"),
                      ("poll_interval", "poll_interval_s"), ("api_keys_file", "api_keys_file"),
                      ("rate_limit", "rate_limit_per_s"), ("request_timeout", "request_timeout_s")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    if args.placement in ("local", "deployment"):
        data["shards_in_ingress"] = data["encoder_in_ingress"] = args.placement == "local"
    for flag in ("encoder_in_ingress", "shards_in_ingress", "use_gpu", "faiss_gpu"):
        if getattr(args, flag):
            data[flag] = True
    if args.replicas_per_shard is not None:
        data.setdefault("shards", {}).update(min_replicas=args.replicas_per_shard,
                                             max_replicas=args.replicas_per_shard)
    enc = data.setdefault("encoder", {})
    if args.encoder_min_replicas is not None:
        enc["min_replicas"] = args.encoder_min_replicas
        enc.setdefault("max_replicas", max(args.encoder_min_replicas, 2))
    if args.encoder_max_replicas is not None:
        enc["max_replicas"] = args.encoder_max_replicas
    if not enc:
        data.pop("encoder")
    if args.ingress_max_replicas is not None:
        data.setdefault("ingress", {})["max_replicas"] = args.ingress_max_replicas
    if args.max_batch_size is not None:
        data.setdefault("batch", {})["max_batch_size"] = args.max_batch_size
    if args.batch_wait_s is not None:
        data.setdefault("batch", {})["batch_wait_timeout_s"] = args.batch_wait_s
    from pipelines.config_show import apply_sets

    return ServeConfig.model_validate(apply_sets(data, getattr(args, "set", [])))


def main(args: argparse.Namespace) -> int:
    from serve.app import deploy, ray_env

    cfg = config_from_args(args)
    ray_env()
    import ray
    from ray import serve

    from sdray import storage

    if not ray.is_initialized():
        kwargs: dict = {"include_dashboard": False}
        env = storage.s3_env() if hasattr(storage, "s3_env") else {}
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        else:
            ray.init(num_cpus=args.num_cpus, **kwargs)
    try:
        url = deploy(cfg, wait_s=args.timeout)
    except Exception as err:  # noqa: BLE001 - reported, then Serve is shut down
        print(f"sdray serve: failed to start: {type(err).__name__}: {err}", file=sys.stderr)
        serve.shutdown()
        return 1
    if args.json:
        print(json.dumps({"url": url}), flush=True)
    else:
        print(f"sdray serve: ready at {url}/  (search page), API {url}/v1/search, docs {url}/docs",
              flush=True)
    if args.no_block:
        return 0
    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():  # second signal: leave now
            os._exit(128 + signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        print("sdray serve: shutting down", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
