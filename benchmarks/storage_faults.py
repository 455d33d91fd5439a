"""What storage faults cost ``sdray featurize``, and that they lose nothing.

Starts SeaweedFS on 127.0.0.1 (tests.s3server) with a fault-injecting proxy in front
(tests.faultproxy), writes ``--shards`` generated shards, then runs the real ``sdray featurize``
CLI entry point through the proxy, same data each time:

- ``clean``: no fault (the baseline);
- ``burst``: once the first shard is done, open connections reset + 3 resets, 2 stalled
  connections and ``--slowdown-s`` seconds of HTTP 503 SlowDown;
- ``outage``: once the first shard is done, the store refuses connections: the job must fail;
- ``rerun``: the same command on the outage's output once the store is back.

Prints a table and, with ``--json``, one JSON line ``{"runs": [{"scenario", "rc",
"samples_in", "samples_out", "seconds"}, ...], "burst_vs_clean": R, "load_avg_1m": L}``.
Retry budgets come from ``SDRAY_STORAGE_*`` (``StorageConfig``), default here: the small ones
below, so the outage fails within seconds.

    python benchmarks/storage_faults.py --shards 8 --per-shard 16 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BUDGET = {"SDRAY_STORAGE_MAX_ATTEMPTS": "3", "SDRAY_STORAGE_CONNECT_TIMEOUT_S": "1",
          "SDRAY_STORAGE_READ_TIMEOUT_S": "2", "SDRAY_STORAGE_WRITE_TIMEOUT_S": "5",
          "SDRAY_STORAGE_BODY_ATTEMPTS": "1",
          "SDRAY_STORAGE_SHARD_ATTEMPTS": "3", "SDRAY_STORAGE_BACKOFF_S": "0.2",
          "SDRAY_STORAGE_BACKOFF_MAX_S": "1", "SDRAY_STORAGE_TASK_RETRIES": "1"}


def _featurize(data: str, out: str) -> tuple[int, float]:
    from pipelines import featurize as job

    p = argparse.ArgumentParser()
    job.add_arguments(p)
    t0 = time.perf_counter()
    rc = job.main(p.parse_args(["--data", data, "--out", out, "--image-size", "32",
                                "--batch-size", "16"]))
    return rc, time.perf_counter() - t0


def _samples_out(out: str) -> tuple[int, int]:
    """(rows in the feature shards the manifest lists, distinct sample ids among them)."""
    import io

    import pyarrow.parquet as pq

    from sdray import storage

    try:
        m = storage.read_json(storage.join(out, "manifest.json"))
    except FileNotFoundError:
        return 0, 0
    ids = [s for f in m["files"]
           for s in pq.read_table(io.BytesIO(storage.read_bytes(f))).column("sample_id").to_pylist()]
    return len(ids), len(set(ids))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=16)
    ap.add_argument("--slowdown-s", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for k, v in BUDGET.items():
        os.environ.setdefault(k, v)

    from pipelines.datasets import ensure_ray
    from pipelines.synth import synth
    from sdray import storage
    from tests.faultproxy import FaultProxy
    from tests.s3server import S3Server
    from tests.test_featurize_faults import first_record_written

    n_in = args.shards * args.per_shard
    runs = []
    with S3Server(tempfile.mkdtemp(prefix="sdray-faults-")) as s3, FaultProxy(s3.port) as proxy:
        s3.export_env()
        synth(s3.uri("data"), n=n_in, n_val=0, n_test=0, image_size=32,
              shard_size=args.per_shard, splits=("train",), progress=False)
        data = s3.uri("data", "train")
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint       # every job call goes through it
        storage.configure_retries(None)
        ensure_ray(num_cpus=4)

        def burst():
            proxy.reset(3)
            proxy.stall(2)
            proxy.answer_503(args.slowdown_s)

        for name, out, action in (("clean", s3.uri("clean"), None),
                                  ("burst", s3.uri("burst"), burst),
                                  ("outage", s3.uri("outage"), proxy.down),
                                  ("rerun", s3.uri("outage"), None)):
            if name == "rerun":
                proxy.up()
            if action is not None:
                proxy.when(first_record_written(s3.endpoint, out), action)
            rc, seconds = _featurize(data, out)
            rows, distinct = _samples_out(out) if rc == 0 else (0, 0)
            runs.append({"scenario": name, "rc": rc, "samples_in": n_in, "samples_out": rows,
                         "distinct_ids": distinct, "seconds": round(seconds, 2),
                         "injected": dict(proxy.injected)})
    base = next(r for r in runs if r["scenario"] == "clean")["seconds"]
    burst_s = next(r for r in runs if r["scenario"] == "burst")["seconds"]
    res = {"runs": runs, "burst_vs_clean": round(burst_s / base, 3),
           "budget": {k: os.environ[k] for k in BUDGET}, "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(f"{'scenario':<8} {'rc':>3} {'in':>5} {'out':>5} {'distinct':>8} {'seconds':>8}", file=sys.stderr)
    for r in runs:
        print(f"{r['scenario']:<8} {r['rc']:>3} {r['samples_in']:>5} {r['samples_out']:>5} "
              f"{r['distinct_ids']:>8} {r['seconds']:>8.2f}", file=sys.stderr)
    print(f"burst / clean wall time: {res['burst_vs_clean']}", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
