"""Load test of the Serve endpoint against the in-process Retriever (bounded; 127.0.0.1 only).

    python benchmarks/serve_load.py                      # builds a small demo index in a temp dir
    python benchmarks/serve_load.py --index URI [--model URI] --requests 64 --concurrency 1,8,32 --kill

For each concurrency level the same text queries (hybrid, k=10, explanations on) go
(a) in process: ``model.encode_texts`` + ``Retriever.search`` from a thread pool, and
(b) through Serve over HTTP (``POST /v1/search``) from a thread pool of clients.
It prints p50/p99 latency, QPS and error counts for both, the Serve/in-process p50 ratio
(target ≤ 1.5× at concurrency 1) and QPS ratio (target ≥ 1 at concurrency 8), for each encoder
placement in ``--variants`` (``deployment``: a QueryEncoder deployment, one hop more;
``ingress``: the encoder inside the ingress replica, ``encoder_in_ingress``; ``local``: the
encoder and every shard inside the ingress replica, ``shards_in_ingress`` too, no handle call;
``auto``: the default, which picks ``local`` or ``deployment`` from the index size), all in one run against the same in-process baseline, with where the Serve time went (the
ingress's own stage timings and what lies outside it: proxy and HTTP). ``+`` options
change one knob each (:func:`variant_config`): ``deployment+spin`` is the old default (idle
OpenMP threads spinning, as before ``OMP_WAIT_POLICY=PASSIVE`` became the default).
``--burst N --burst-concurrency C`` then sends N searches from C client threads at once to the
last variant and prints the answers by status and the p50/p99 time to a 503 (overload must be
refused fast). ``--kill`` then runs one more level during which a QueryEncoder replica is killed
(``ray.kill``) and reports how many requests failed and when service recovered. ``--json`` prints every number as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUERIES = [
    "a red circle", "two small blue squares", "a large green star on a striped background",
    "a yellow triangle in the top left corner", "three purple rings", "a white cross on black",
    "an orange hexagon and a pink diamond", "a photo of a gray box", "small cyan dots",
    "a brown star next to a red square", "a big black circle on a checkered background",
    "several tiny yellow stars", "a violet rhombus", "a scarlet disc at the bottom",
    "green plus signs", "a blue ring on a gradient background",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 60.0, out: dict | None = None) -> tuple[int, float]:
    """``(status, seconds)``; the response body's ``took_ms`` and ``timings`` go into ``out``."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/search", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as err:
        status = err.code
    except Exception:  # noqa: BLE001 - connection errors count as failures
        status = 0
    dt = time.perf_counter() - t0
    if out is not None and status == 200:
        got = json.loads(raw)
        out.update(took_ms=got["took_ms"], **got["timings"])
    return status, dt


def _stats(lat: list[float], wall: float, errors: int) -> dict:
    a = np.asarray(lat) * 1000 if lat else np.zeros(1)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "qps": len(lat) / wall if wall > 0 else 0.0, "errors": errors, "n": len(lat)}


def run_serve(url: str, queries: list[str], n: int, conc: int, k: int) -> dict:
    bodies = [{"text": queries[i % len(queries)], "k": k, "mode": "hybrid"} for i in range(n)]
    return run_bodies(url, bodies, conc)


def run_bodies(url: str, bodies: list[dict], conc: int) -> dict:
    """POST every body to ``/v1/search`` from ``conc`` client threads: latency, QPS, errors."""
    lat, errors, lock, inside = [], 0, threading.Lock(), []

    def one(body):
        nonlocal errors
        got: dict = {}
        status, dt = _post(url, body, out=got)
        with lock:
            lat.append(dt)
            errors += status != 200
            if got:
                inside.append(got)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        list(pool.map(one, bodies))
    out = _stats(lat, time.perf_counter() - t0, errors)
    return out | {"where_ms": where_the_time_goes(lat, inside)}


def burst(url: str, queries: list[str], n: int, conc: int, k: int) -> dict:
    """``n`` searches from ``conc`` client threads at once: the answers by status (0: no HTTP
    answer), and how long the 503s (refused for overload) and the 200s took."""
    took: dict[int, list[float]] = {}
    lock = threading.Lock()

    def one(i):
        status, dt = _post(url, {"text": queries[i % len(queries)], "k": k, "mode": "hybrid"})
        with lock:
            took.setdefault(status, []).append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        list(pool.map(one, range(n)))
    out = {"requests": n, "concurrency": conc, "wall_s": time.perf_counter() - t0,
           "by_status": {str(s): len(v) for s, v in sorted(took.items())},
           "503_over_5s": sum(dt > 5 for dt in took.get(503, []))}
    for status in (503, 200):
        if took.get(status):
            ms = np.asarray(took[status]) * 1000
            out[f"{status}_ms"] = {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                                   "max": float(ms.max())}
    return out


def print_burst(b: dict) -> None:
    print(f"\nburst: {b['requests']} requests at concurrency {b['concurrency']} in {b['wall_s']:.1f}s; "
          f"by status: {b['by_status']}")
    for status in ("503", "200"):
        t = b.get(f"{status}_ms")
        if t:
            print(f"  time to a {status}: p50 {t['p50']:.0f} ms, p99 {t['p99']:.0f} ms, max {t['max']:.0f} ms")
    print(f"  503s that took more than 5 s: {b['503_over_5s']}")


def where_the_time_goes(lat: list[float], inside: list[dict]) -> dict:
    """Medians of the ingress's own stage timings (``took_ms`` = from route entry to response
    body; ``encode_ms``, ``search_ms`` = fan-out to the shard groups and back) and of what the
    client saw beyond ``took_ms`` (HTTP proxy, the hop to the ingress, JSON, the client)."""
    if not inside:
        return {}
    med = {key: float(np.median([d[key] for d in inside])) for key in ("took_ms", "encode_ms", "search_ms")}
    med["outside_ingress_ms"] = float(np.median(lat) * 1000 - med["took_ms"])
    med["mean_batch"] = float(np.mean([d["batch_size"] for d in inside]))
    return med


def run_inprocess(model, retriever, queries: list[str], n: int, conc: int, k: int, explain: int) -> dict:
    lat, errors, lock = [], 0, threading.Lock()

    def one(i):
        nonlocal errors
        t0 = time.perf_counter()
        try:
            enc = model.encode_texts([queries[i % len(queries)]])
            retriever.search(enc.dense, enc.sparse, k=k, mode="hybrid", side="images", explain=explain)
            ok = True
        except Exception:  # noqa: BLE001
            ok = False
        with lock:
            lat.append(time.perf_counter() - t0)
            errors += not ok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        list(pool.map(one, range(n)))
    return _stats(lat, time.perf_counter() - t0, errors)


def kill_test(url: str, queries: list[str], n: int, conc: int, k: int) -> dict:
    """Load at ``conc`` while one QueryEncoder replica is killed a third of the way in."""
    import ray

    bodies = [{"text": queries[i % len(queries)], "k": k} for i in range(n)]
    results: list[tuple[float, int]] = []
    lock = threading.Lock()
    t_start = time.perf_counter()

    def one(body):
        status, dt = _post(url, body)
        with lock:
            results.append((time.perf_counter() - t_start, status))

    killed = {}

    def killer():
        while len(results) < n // 3:
            time.sleep(0.01)
        names = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if "QueryEncoder" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
        if names:
            actor = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
            ray.kill(actor, no_restart=True)
            killed.update(name=names[0]["name"], at_s=time.perf_counter() - t_start,
                          replicas=len(names))

    kt = threading.Thread(target=killer)
    kt.start()
    with ThreadPoolExecutor(conc) as pool:
        list(pool.map(one, bodies))
    kt.join()
    failed = [t for t, s in results if s != 200]
    after = [t for t, s in results if s == 200 and t > killed.get("at_s", 0)]
    last_fail = max(failed) if failed else killed.get("at_s", 0)
    recovered = [t for t in after if t > last_fail]
    return {"requests": len(results), "failed": len(failed), "killed": killed.get("name"),
            "encoder_replicas_before": killed.get("replicas"),
            "killed_at_s": round(killed.get("at_s", 0), 2),
            "recovered_after_s": round(min(recovered) - killed["at_s"], 2) if recovered and killed else None,
            "succeeded_after_kill": len(after)}


#: ``+`` options of a variant (``local+fast+t1``): ServeConfig changes
SERVE_FAST_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                  "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}


def variant_config(variant: str, cfg):
    """``cfg`` for a variant: a placement (deployment | ingress | local) and ``+`` options:
    ``spin`` (replica_env={}: idle OpenMP threads spin), ``fast`` (Serve's user code on the
    replica's own event loop, access log buffered), ``tN`` (N torch threads in the encoder)."""
    place, *opts = variant.split("+")
    if place not in ("deployment", "ingress", "local", "auto"):
        raise ValueError(f"unknown placement {place!r}")
    update: dict = {"encoder_in_ingress": place in ("ingress", "local"),
                    "shards_in_ingress": place == "local"}
    if place == "auto":                 # the default: decided from the index size (resolve_placement)
        update = {"encoder_in_ingress": None, "shards_in_ingress": None}
    env = dict(cfg.replica_env)
    for opt in opts:
        if opt == "spin":
            env = {}
        elif opt == "fast":
            env |= SERVE_FAST_ENV
        elif opt[:1] == "t" and opt[1:].isdigit():
            update["batch"] = cfg.batch.model_copy(update={"torch_threads": int(opt[1:])})
        else:
            raise ValueError(f"unknown variant option {opt!r}")
    return cfg.model_copy(update=update | {"replica_env": env})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", help="index URI (default: build a demo index in a temp dir)")
    p.add_argument("--model", help="model URI (default: the index manifest's)")
    p.add_argument("--n-images", type=int, default=48, help="demo index size")
    p.add_argument("--shards", type=int, default=2, help="demo index shards")
    p.add_argument("--requests", type=int, default=64, help="requests per level (bounded)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kill", action="store_true", help="kill an encoder replica under load")
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--variants", default="deployment,auto",
                   help="placements to measure: deployment, ingress, local, auto, each optionally "
                        "+spin, +fast or +tN (comma separated)")
    p.add_argument("--burst", type=int, default=0, help="then send this many searches at once "
                   "against the last variant (overload: 503s by status and how fast they come)")
    p.add_argument("--burst-concurrency", type=int, default=256, help="client threads of the burst")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.requests > 2000 or args.burst > 2000:
        p.error("--requests and --burst are capped at 2000")
    if not 1 <= args.burst_concurrency <= 512:
        p.error("--burst-concurrency must be between 1 and 512")

    from serve.app import ray_env
    from serve.config import ServeConfig

    ray_env()
    import ray
    from ray import serve

    from sdray.index import Retriever
    from sdray.index import manifest as mf
    from sdray.model import RetrievalModel
    from serve.app import deploy, resolve_placement
    from serve.testing import build_demo_index

    tmp = None
    if args.index is None:
        tmp = tempfile.mkdtemp(prefix="sdray-load-")
        print(f"building a demo index ({args.n_images} images, {args.shards} shards) in {tmp}", flush=True)
        demo = build_demo_index(tmp, n_images=args.n_images, shards=args.shards)
        args.index, args.model = demo.index, demo.model
    root, pinned = mf.index_root(args.index)
    model_uri = args.model or mf.load_manifest(root, pinned)["model"]
    levels = [int(c) for c in args.concurrency.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    explain = ServeConfig(index=args.index).explain_terms

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        model = RetrievalModel.load(model_uri)
        retriever = Retriever.load(args.index)
        for q in QUERIES[:4]:
            run_inprocess(model, retriever, [q], 1, 1, args.k, explain)
        baseline = {c: run_inprocess(model, retriever, QUERIES, args.requests, c, args.k, explain)
                    for c in levels}
        report: dict = {"index": args.index, "requests_per_level": args.requests,
                        "load_average": os.getloadavg(), "inprocess": baseline, "variants": {}}
        url = None
        for variant in variants:
            cfg = variant_config(variant, ServeConfig(index=args.index, model=model_uri, port=_free_port(),
                                                      poll_interval_s=0))
            t0 = time.perf_counter()
            url = deploy(cfg)
            placed = resolve_placement(cfg)
            print(f"[{variant}] serve up in {time.perf_counter() - t0:.1f}s at {url} (shards in the ingress: "
                  f"{placed.shards_in_ingress}, encoder in the ingress: {placed.encoder_in_ingress})", flush=True)
            for q in QUERIES[:4]:
                _post(url, {"text": q, "k": args.k})
            rows = []
            for c in levels:
                ip, sv = baseline[c], run_serve(url, QUERIES, args.requests, c, args.k)
                rows.append({"concurrency": c, "inprocess": ip, "serve": sv,
                             "p50_ratio": sv["p50_ms"] / ip["p50_ms"] if ip["p50_ms"] else None,
                             "qps_ratio": sv["qps"] / ip["qps"] if ip["qps"] else None})
            report["variants"][variant] = rows
            status_ms = []
            for _ in range(5):      # what an ingress replica pays per rate_limit_refresh_s for its share
                t1 = time.perf_counter()
                serve.status()
                status_ms.append((time.perf_counter() - t1) * 1000)
            report.setdefault("serve_status_ms", {})[variant] = float(np.median(status_ms))
            print(f"\nplacement: {variant}")
            print(f"{'conc':>4} | {'in-proc p50':>11} {'p99':>8} {'QPS':>7} | {'serve p50':>9} {'p99':>8} "
                  f"{'QPS':>7} {'errors':>6} | {'p50 ratio':>9} {'QPS ratio':>9}")
            for r in rows:
                ip, sv = r["inprocess"], r["serve"]
                print(f"{r['concurrency']:>4} | {ip['p50_ms']:>9.1f}ms {ip['p99_ms']:>6.1f}ms {ip['qps']:>7.1f} | "
                      f"{sv['p50_ms']:>7.1f}ms {sv['p99_ms']:>6.1f}ms {sv['qps']:>7.1f} {sv['errors']:>6} | "
                      f"{r['p50_ratio']:>8.2f}x {r['qps_ratio']:>8.2f}x")
            print(f"  serve.status() (the rate-limit replica count): median {np.median(status_ms):.1f} ms of 5")
            for r in rows:
                w = r["serve"].get("where_ms") or {}
                if w:
                    print(f"  c={r['concurrency']}: inside the ingress {w['took_ms']:.1f} ms (encode "
                          f"{w['encode_ms']:.1f}, search {w['search_ms']:.1f}), outside it "
                          f"{w['outside_ingress_ms']:.1f} ms; mean encoder batch {w['mean_batch']:.1f}")
            if variant != variants[-1]:
                serve.shutdown()
        if args.burst and url:
            report["burst"] = burst(url, QUERIES, args.burst, args.burst_concurrency, args.k)
            print_burst(report["burst"])
        if args.kill and url:
            kt = kill_test(url, QUERIES, max(args.requests, 96), 8, args.k)
            report["kill"] = kt
            print(f"\nreplica kill under load (concurrency 8): {kt['failed']} of {kt['requests']} requests "
                  f"failed; killed {kt['killed']} at {kt['killed_at_s']}s; served again "
                  f"{kt['recovered_after_s']}s after the kill")
        if args.json:
            print(json.dumps(report))
    finally:
        serve.shutdown()
        ray.shutdown()
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
