"""A 1M-document index through Serve: latency at concurrency 1, 8 and 32, errors, replica memory.

    python benchmarks/serve_scale.py build                 # once: 1M caption documents (~6 min)
    python benchmarks/serve_scale.py run --json            # p50/p99/QPS per level, replica RSS

``build`` reuses :mod:`benchmarks.scale`: its generated 1M-pair feature corpus (the packaged
backbone's dimensions) and its model (the packaged backbone and projections, a random sparse head
writing the top 64 of the first 1,024 term ids), and runs the real ``sdray index`` with
``--sides captions`` (1,000,000 caption documents, answering image queries), dense IVF and sparse
Seismic (``IndexConfig`` defaults otherwise: 5 shards of 200,000). The index lands in
``--out`` and is reused by every ``run``.

``run`` starts Serve on the index (``--placement``: ``deployment`` = the default ServeConfig, a
QueryEncoder deployment and one ShardSearcher deployment per shard; ``local`` = encoder and every
shard inside the ingress replica), sends the same ``--requests`` image queries (generated PNGs,
hybrid, k=10, explanations on) at each concurrency, and prints p50/p99 latency, QPS and errors per
level, then the resident memory (RSS) of every Serve replica process (by process title). Clean
mmap'd shard pages count in RSS once touched; they are the page cache's, not the heap's.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

N_PAIRS = 1_000_000


def build(args) -> dict:
    from benchmarks import scale

    model = scale.make_model(os.path.join(args.workdir, "model"))
    corpus = scale.make_feature_corpus(os.path.join(args.workdir, f"features-{N_PAIRS}-s0"), N_PAIRS, 0, 20000)
    os.makedirs(args.out, exist_ok=True)
    cfg_path = os.path.join(args.out, "index-config.json")
    with open(cfg_path, "w") as fh:
        json.dump({"dense": {"kind": "ivf"}, "sparse": {"kind": "seismic"}}, fh)
    cmd = [sys.executable, "-m", "pipelines.cli", "index", "--model", model, "--corpus", corpus,
           "--out", os.path.join(args.out, "index"), "--sides", "captions", "--config", cfg_path,
           "--batch-size", "2048", "--json"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"seconds": round(time.perf_counter() - t0, 1), "shards": summary.get("shards"),
            "counts": summary.get("counts"), "index": os.path.join(args.out, "index")}


def query_images(n: int, seed: int = 0) -> list[str]:
    """``n`` small generated PNGs (coloured shapes), base64."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (96, 96), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = rng.integers(0, 64, 2)
            draw.ellipse([int(x), int(y), int(x) + 30, int(y) + 30], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def replica_memory() -> list[dict]:
    """RSS (MiB) of every Serve replica process on this machine (Linux ``/proc``), found by the
    process title Ray gives an actor (``ray::ServeReplica:<app>:<deployment>[.<method>]``)."""
    rows = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                title = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            if not title.startswith("ray::ServeReplica:"):
                continue
            with open(f"/proc/{pid}/status") as fh:
                kib = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue  # the process ended meanwhile
        name = title.split()[0].split(":")[-1].split(".")[0]
        rows.append({"replica": name, "rss_mib": round(kib / 1024, 1)})
    return sorted(rows, key=lambda r: r["replica"])


def run(args) -> dict:
    from benchmarks.serve_load import _free_port, _post, run_bodies, variant_config
    from serve.app import deploy, ray_env
    from serve.config import ServeConfig

    ray_env()
    import ray
    from ray import serve

    levels = [int(c) for c in args.concurrency.split(",")]
    images = query_images(16)
    bodies = [{"image": images[i % len(images)], "k": args.k, "mode": "hybrid"} for i in range(args.requests)]
    report: dict = {"index": args.index, "placement": args.placement, "requests_per_level": args.requests,
                    "load_average": os.getloadavg(), "levels": []}
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        cfg = variant_config(args.placement, ServeConfig(index=args.index, port=_free_port(), poll_interval_s=0,
                                                         request_timeout_s=60.0))
        t0 = time.perf_counter()
        url = deploy(cfg, wait_s=420)
        report["startup_s"] = round(time.perf_counter() - t0, 1)
        print(f"[{args.placement}] serve up in {report['startup_s']}s at {url}", flush=True)
        for body in bodies[:4]:
            _post(url, body)
        for c in levels:
            row = run_bodies(url, bodies, c) | {"concurrency": c}
            report["levels"].append(row)
            print(f"c={c}: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, {row['qps']:.1f} QPS, "
                  f"{row['errors']} errors of {row['n']}", flush=True)
        report["replicas"] = replica_memory()
    finally:
        serve.shutdown()
        ray.shutdown()
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"\nindex {report['index']}, placement {report['placement']}, {report['requests_per_level']} "
          f"image queries per level (hybrid, k=10), Serve up in {report.get('startup_s')} s")
    print("| concurrency | p50 ms | p99 ms | QPS | errors | in the ingress: encode / search ms |")
    print("|---|---|---|---|---|---|")
    for r in report["levels"]:
        w = r.get("where_ms") or {}
        print(f"| {r['concurrency']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['qps']:.1f} | "
              f"{r['errors']} / {r['n']} | {w.get('encode_ms', float('nan')):.1f} / "
              f"{w.get('search_ms', float('nan')):.1f} |")
    print("\n| replica | RSS MiB |\n|---|---|")
    for r in report.get("replicas", []):
        print(f"| {r['replica']} | {r['rss_mib']:,.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the 1M-document index once")
    b.add_argument("--workdir", default="/tmp/sdray-scale", help="benchmarks/scale.py's workdir (corpus, model)")
    b.add_argument("--out", default="/tmp/sdray-serve-1m")
    r = sub.add_parser("run", help="load-test Serve on the built index")
    r.add_argument("--index", default="/tmp/sdray-serve-1m/index")
    r.add_argument("--placement", default="deployment", help="deployment | ingress | local (+options, "
                   "as benchmarks/serve_load.py --variants)")
    r.add_argument("--requests", type=int, default=200, help="requests per level (bounded)")
    r.add_argument("--concurrency", default="1,8,32")
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--num-cpus", type=int, default=8)
    r.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "build":
        out = build(args)
        print(json.dumps(out))
        return 0
    if args.requests > 2000:
        p.error("--requests is capped at 2000")
    report = run(args)
    if args.json:
        print(json.dumps(report))
    return 1 if any(r["errors"] for r in report["levels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
