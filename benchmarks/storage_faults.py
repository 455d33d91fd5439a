"""What storage faults cost ``sdray featurize`` and ``sdray index``, and that they lose nothing.

Starts SeaweedFS on 127.0.0.1 (tests.s3server) with a fault-injecting proxy in front
(tests.faultproxy), writes ``--shards`` generated tar shards (featurize's input) and as many feature
Parquet files plus a tiny model (index's input), then runs the real ``sdray featurize`` and
``sdray index`` entry points through the proxy, same data each time:

- ``clean``: no fault (the baseline);
- ``burst``: mid-run (featurize: once the first shard is done; index: once the build has
  started), open connections reset + 3 resets, 2 stalled connections and ``--slowdown-s``
  seconds of HTTP 503 SlowDown;
- ``outage``: mid-run (featurize: once the first shard is done; index: once its first index
  file is written), the store refuses connections: the job must fail (exit code 4);
- ``rerun``: the same command on the outage's output once the store is back.

Prints a Markdown table (samples in vs out, for index documents: images + captions; seconds and
the ratio to the clean run = what the retries cost) and, with ``--json``, one JSON line.
Retry budgets come from ``SDRAY_STORAGE_*`` (``StorageConfig``), default here: the small ones
below, so the outage fails within seconds.

    python benchmarks/storage_faults.py --shards 8 --per-shard 16 --jobs featurize,index
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
    try:
        rc = job.main(p.parse_args(["--data", data, "--out", out, "--image-size", "32",
                                    "--batch-size", "16"]))
    except Exception as err:  # noqa: BLE001 - the CLI's own mapping of a failure to its exit code
        from pipelines.cli import EXIT_CODES, classify

        print(f"featurize failed: {err}"[:300], file=sys.stderr)
        rc = EXIT_CODES[classify(err)]
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


def _index(model: str, corpus: str, out: str, shards: int) -> tuple[int, float]:
    from pipelines import index as job

    p = argparse.ArgumentParser()
    job.add_arguments(p)
    t0 = time.perf_counter()
    try:
        rc = job.main(p.parse_args(["--model", model, "--corpus", corpus, "--out", out,
                                    "--shards", str(shards), "--dense-index", "flat",
                                    "--set", "sparse.min_docs=100000", "--batch-size", "16"]))
    except Exception as err:  # noqa: BLE001 - the CLI's own mapping of a failure to its exit code
        from pipelines.cli import EXIT_CODES, classify

        print(f"index failed: {err}"[:300], file=sys.stderr)
        rc = EXIT_CODES[classify(err)]
    return rc, time.perf_counter() - t0


def _documents_out(out: str) -> tuple[int, int]:
    """(image + caption documents in the published index, distinct ids among them)."""
    from tests.test_index_faults import doc_ids

    ids = [f"{side}/{i}" for side, got in doc_ids(out).items() for i in got]
    return len(ids), len(set(ids))


def _scenarios(s3, proxy, run, count, trigger, n_in, slowdown_s) -> list[dict]:
    """clean, burst, outage, rerun of one job: ``run(out) -> (rc, s)``; ``count(out) -> (n, distinct)``;
    ``trigger(out)``: the condition that starts a fault mid-run."""
    def burst():
        proxy.reset(3)
        proxy.stall(2)
        proxy.answer_503(slowdown_s)

    runs = []
    for name, out, action in (("clean", "clean", None), ("burst", "burst", burst),
                              ("outage", "outage", proxy.down), ("rerun", "outage", None)):
        out = s3.uri(run.__name__, out)
        if name == "rerun":
            proxy.up()
        before = dict(proxy.injected)
        if action is not None:
            proxy.when(trigger(name, out), action)
        rc, seconds = run(out)
        rows, distinct = count(out) if rc == 0 else (0, 0)
        runs.append({"scenario": name, "rc": rc, "samples_in": n_in, "samples_out": rows,
                     "distinct_ids": distinct, "seconds": round(seconds, 2),
                     "injected": {k: proxy.injected[k] - before[k] for k in before}})
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="featurize,index", help="which jobs: featurize, index")
    ap.add_argument("--shards", type=int, default=8, help="input shards (featurize: tar, index: feature Parquet)")
    ap.add_argument("--per-shard", type=int, default=16)
    ap.add_argument("--index-shards", type=int, default=4)
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
    from tests.test_index_faults import make_corpus, server_has

    n_in = args.shards * args.per_shard
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    runs = []
    load_before = round(os.getloadavg()[0], 2)
    with S3Server(tempfile.mkdtemp(prefix="sdray-faults-")) as s3, FaultProxy(s3.port) as proxy:
        s3.export_env()
        storage.configure_retries(None)
        data = s3.uri("data", "train")
        synth(s3.uri("data"), n=n_in, n_val=0, n_test=0, image_size=32,
              shard_size=args.per_shard, splits=("train",), progress=False)
        corpus = make_corpus(s3.uri("index-input"), tempfile.mkdtemp(prefix="sdray-faults-"),
                             args.shards, args.per_shard) if "index" in jobs else None
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint       # every job call goes through it
        ensure_ray(num_cpus=4)
        if "featurize" in jobs:
            def featurize(out):
                return _featurize(data, out)

            def feat_trigger(name, out):
                return first_record_written(s3.endpoint, out)

            runs += [{"job": "featurize", **r} for r in _scenarios(
                s3, proxy, featurize, _samples_out, feat_trigger, n_in, args.slowdown_s)]
        if "index" in jobs:
            def index(out):
                return _index(corpus["model"], corpus["corpus"], out, args.index_shards)

            def index_trigger(name, out):      # burst as the build starts, outage at its first file
                return server_has(s3.endpoint, out, "_building" if name == "burst" else "/shard-")

            runs += [{"job": "index", **r} for r in _scenarios(
                s3, proxy, index, _documents_out, index_trigger, 2 * n_in, args.slowdown_s)]
    res = {"runs": runs, "budget": {k: os.environ[k] for k in BUDGET},
           "load_avg_1m_before": load_before, "load_avg_1m_after": round(os.getloadavg()[0], 2)}
    print("| job | scenario | exit code | in | out | distinct ids | seconds | vs clean | faults injected |")
    print("|---|---|---|---|---|---|---|---|---|")
    for job in jobs:
        base = next(r["seconds"] for r in runs if r["job"] == job and r["scenario"] == "clean")
        for r in (r for r in runs if r["job"] == job):
            faults = ", ".join(f"{k} {v}" for k, v in r["injected"].items() if v) or "-"
            if r["scenario"] == "outage":
                faults = "store down"
            print(f"| {job} | {r['scenario']} | {r['rc']} | {r['samples_in']} | {r['samples_out']} | "
                  f"{r['distinct_ids']} | {r['seconds']:.1f} | {r['seconds'] / base:.2f}x | {faults} |")
    print(f"load average (1 min) before {load_before}, after {res['load_avg_1m_after']}")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
