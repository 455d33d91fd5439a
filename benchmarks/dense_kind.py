"""Where does IVF start to pay over flat? The measurement behind ``DenseIndexConfig.ivf_min_docs``.

For each shard size n: build a flat and an IVF index (sdray's settings: nlist = min(1024, n/39),
nprobe 32) over the synthetic 256-d clustered vectors of ``sdray.index.synthetic`` (the index
benchmark's data), then time one query at a time (batch 1, p50 over the query set, one faiss
thread so a shared machine disturbs both alike) and IVF's recall@10 against flat's exact top-10.
Baseline: flat, in the same run. The suggested threshold is the smallest n at which IVF is at
least ``--min-speedup`` times faster than flat with recall@10 >= ``--min-recall``; below it flat
is exact and already fast, and skips IVF's k-means build.

    python benchmarks/dense_kind.py --sizes 5000,10000,20000,50000,100000 --json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import faiss

from sdray.index.config import DenseIndexConfig
from sdray.index.dense import DenseIndex
from sdray.index.synthetic import make_synthetic


def _p50_ms(index: DenseIndex, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    times, ids = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, i = index.search(q[None], k)
        times.append(time.perf_counter() - t0)
        ids.append(i[0])
    return 1000 * float(np.median(times)), np.stack(ids)


def measure(n: int, n_queries: int, k: int, seed: int) -> dict:
    data = make_synthetic(n, n_queries, seed=seed, nnz_min=1, nnz_max=2, query_nnz=(1, 2))
    row: dict = {"n": n}
    t0 = time.perf_counter()
    flat = DenseIndex.build(data.dense, DenseIndexConfig(kind="flat"))
    row["flat_build_s"] = round(time.perf_counter() - t0, 3)
    row["flat_p50_ms"], exact = _p50_ms(flat, data.q_dense, k)
    t0 = time.perf_counter()
    ivf = DenseIndex.build(data.dense, DenseIndexConfig(kind="ivf", gpu=False))
    row["ivf_build_s"] = round(time.perf_counter() - t0, 3)
    row["ivf_p50_ms"], got = _p50_ms(ivf, data.q_dense, k)
    row["ivf_recall@10"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact)]))
    row["speedup"] = round(row["flat_p50_ms"] / max(row["ivf_p50_ms"], 1e-9), 2)
    row["flat_p50_ms"], row["ivf_p50_ms"] = round(row["flat_p50_ms"], 4), round(row["ivf_p50_ms"], 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="5000,10000,20000,50000,100000")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--min-speedup", type=float, default=5.0)
    ap.add_argument("--min-recall", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        row = measure(n, args.queries, args.k, args.seed)
        rows.append(row)
        print(f"n={n:>8}: flat {row['flat_p50_ms']:.3f} ms, ivf {row['ivf_p50_ms']:.3f} ms "
              f"({row['speedup']:.1f}x, recall@10 {row['ivf_recall@10']:.3f}, build "
              f"{row['ivf_build_s']:.2f}s vs {row['flat_build_s']:.2f}s)", flush=True)
    ok = [r["n"] for r in rows if r["speedup"] >= args.min_speedup and r["ivf_recall@10"] >= args.min_recall]
    suggested = min(ok) if ok else None
    print(f"suggested ivf_min_docs: {suggested} (first size with >= {args.min_speedup}x at recall@10 "
          f">= {args.min_recall}; flat is the baseline)")
    if args.json:
        print(json.dumps({"rows": rows, "suggested_ivf_min_docs": suggested, "threads": args.threads,
                          "min_speedup": args.min_speedup, "min_recall": args.min_recall}))


if __name__ == "__main__":
    main()
