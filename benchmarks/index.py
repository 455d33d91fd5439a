"""Index benchmark: sdray shards (exact sparse, Seismic, FAISS Flat/IVF, hybrid) vs Milvus Lite and PISA.

Synthetic vectors shaped like a trained model's (sdray.index.synthetic: 256-d clustered dense,
30-80 distinct Zipf-like terms per document out of 30,522, queries are noisy document views).
Every system sees the same vectors. Recall@10 is against exact top-10 (dense: cosine; sparse:
dot product; hybrid: the exact calibrated sum w1*cos/tau + w2*sparse over all documents).
Latency = one query at a time (batch 1), p50/p99 over the query set.

    /work/venv/bin/python benchmarks/index.py --n 100000 --queries 200 --json runs/bench-100k.json
    /work/venv/bin/python benchmarks/index.py --n 1000000 --queries 200 --no-milvus

Milvus Lite (pip: milvus-lite, pymilvus) is what a Python user embeds; its 3.x engine is written
in Python. Its WeightedRanker normalises scores by default (arctan), so its hybrid recall is
reported against the same exact weighted sum.

PISA (pip: pyterrier-pisa; Mallia et al., "PISA: Performant Indexes and Search for Academia",
OSIRRC 2019) is a C++ block-max WAND engine; sparse part only. Weights become integer impacts
round(w * --pisa-scale) for documents and queries alike, scored by PISA's "quantized" scorer (a dot
product of the integer vectors), so its recall is lost only to that rounding. No JVM is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

import faiss

from sdray.index.config import DenseIndexConfig, IndexConfig, SparseIndexConfig
from sdray.index.csr import ExactSparseIndex
from sdray.index.dense import DenseIndex
from sdray.index.retriever import Retriever
from sdray.index.shard import Shard, _npy_bytes
from sdray.index.sparse import SeismicIndex
from sdray.index.synthetic import make_synthetic

W1, W2, TAU = 0.1, 0.1, 0.07


def pct(times):
    t = np.asarray(times) * 1000
    return float(np.percentile(t, 50)), float(np.percentile(t, 99))


def recall(got, want):
    out = []
    for g, w in zip(got, want):
        w = [x for x in w if x >= 0]
        if w:
            out.append(len(set(int(x) for x in g if x >= 0) & set(int(x) for x in w)) / len(w))
    return float(np.mean(out))


def ground_truth(syn, k):
    """Exact dense, sparse and hybrid top-k per query."""
    ex = ExactSparseIndex(syn.sparse)
    sp_scores = ex.scores_all(syn.q_sparse).toarray()
    dense_top, sparse_top, hybrid_top = [], [], []
    for r in range(len(syn.q_dense)):
        cos = syn.dense @ syn.q_dense[r]
        dense_top.append(np.argsort(-cos)[:k])
        s = sp_scores[r]
        pos = np.flatnonzero(s > 0)
        sparse_top.append(pos[np.argsort(-s[pos], kind="stable")][:k])
        h = W1 * cos / TAU + W2 * s
        hybrid_top.append(np.argsort(-h)[:k])
    return ex, dense_top, sparse_top, hybrid_top


def timed(fn, queries):
    times, results = [], []
    for q in queries:
        t = time.perf_counter()
        results.append(fn(q))
        times.append(time.perf_counter() - t)
    return times, results


def run(args):
    rows = []
    n, nq, k = args.n, args.queries, args.k
    t0 = time.time()
    syn = make_synthetic(n, nq, dim=256, seed=args.seed)
    info = {"n": n, "queries": nq, "mean_doc_nnz": syn.sparse.nnz / n, "mean_query_nnz": syn.q_sparse.nnz / nq,
            "gen_s": time.time() - t0, "cpu_count": os.cpu_count()}
    print(json.dumps(info), flush=True)
    t = time.time()
    exact, gt_dense, gt_sparse, gt_hybrid = ground_truth(syn, k)
    info["ground_truth_s"] = time.time() - t
    q_rows = [syn.q_sparse.take([r]) for r in range(nq)]

    def add(system, part, threads, build_s, nbytes, times, rec, note=""):
        p50, p99 = pct(times) if times else (None, None)
        row = {"system": system, "part": part, "threads": threads,
               "build_docs_per_s": None if build_s is None else n / build_s,
               "bytes_per_doc": None if nbytes is None else nbytes / n,
               "p50_ms": p50, "p99_ms": p99, "recall@10": rec, "note": note}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # ---- sdray: exact sparse --------------------------------------------------------------
    faiss.omp_set_num_threads(2)
    t = time.time()
    ex = ExactSparseIndex(syn.sparse)
    _ = ex.term_major
    ex_build = time.time() - t
    csr_bytes = sum(len(_npy_bytes(getattr(syn.sparse, p))) for p in ("indptr", "indices", "values"))
    tm, res = timed(lambda q: ex.search(q, k)[1][0], q_rows)
    add("sdray exact CSR", "sparse", 1, ex_build, csr_bytes, tm, recall(res, gt_sparse), "stored CSR = the index")

    # ---- sdray: Seismic -------------------------------------------------------------------
    scfg = SparseIndexConfig(query_cut=args.query_cut, heap_factor=args.heap_factor)
    t = time.time()
    seis = SeismicIndex.build(syn.sparse, scfg, threads=2)
    seis_build = time.time() - t
    with tempfile.TemporaryDirectory() as tmp:
        seis.save(os.path.join(tmp, "s"))
        seis_bytes = os.path.getsize(os.path.join(tmp, "s"))
    for qc, hf in [(scfg.query_cut, scfg.heap_factor), *args.seismic_search]:  # search-time knobs, one index
        for th in (1, 2):
            tm, res = timed(lambda q: seis.search(q, k, query_cut=qc, heap_factor=hf, threads=th)[1][0], q_rows)
            add("sdray Seismic", "sparse", th, seis_build if th == 2 else None, seis_bytes, tm, recall(res, gt_sparse),
                f"query_cut={qc} heap_factor={hf}; build on 2 threads; +{csr_bytes / n:.0f} B/doc stored CSR")
    if args.sparse_only:
        return info, rows

    # ---- sdray: FAISS Flat / IVF ----------------------------------------------------------
    dense_idx = {}
    for kind in args.dense_kinds:
        dcfg = DenseIndexConfig(kind=kind, nlist=args.nlist or int(4 * np.sqrt(n)), nprobe=args.nprobe)
        t = time.time()
        d = DenseIndex.build(syn.dense, dcfg)
        b = time.time() - t
        nbytes = len(d.to_bytes())
        dense_idx[kind] = d
        for th in (1, 2):
            faiss.omp_set_num_threads(th)
            tm, res = timed(lambda q: d.search(q[None], k)[1][0], syn.q_dense)
            add(f"sdray FAISS {kind}", "dense", th, b if th == 2 else None, nbytes, tm, recall(res, gt_dense),
                f"nlist={d.index.nlist if kind == 'ivf' else ''} nprobe={dcfg.nprobe}" if kind == "ivf" else "")

    # ---- sdray: hybrid through the Retriever ------------------------------------------------
    fusion = {"method": "calibrated", "w1": W1, "w2": W2, "tau": TAU}
    meta = {"id": [str(i) for i in range(n)], "image_id": [None] * n, "caption": [None] * n, "uri": [None] * n}
    doc_no = np.arange(n, dtype=np.int64)
    for kind, d in dense_idx.items():
        for sparse_name, sp in (("exact", ex), ("Seismic", seis)):
            cfg = IndexConfig(dense=d.config, sparse=scfg)
            shard = Shard(d, sp, syn.sparse, meta, doc_no, cfg, "shard-00000")
            r = Retriever({"images": [shard]}, cfg, fusion)
            for kp in args.kprime:
                for th in (1, 2):
                    faiss.omp_set_num_threads(th)
                    cfg.threads = th
                    tm, res = timed(
                        lambda i: [h.doc_no for h in r.search(syn.q_dense[i], q_rows[i], k=k, mode="hybrid", candidates=kp)[0]],
                        range(nq),
                    )
                    add(f"sdray hybrid {kind}+{sparse_name}", "hybrid", th, None, None, tm, recall(res, gt_hybrid), f"k'={kp}")
    faiss.omp_set_num_threads(2)

    # ---- PISA ---------------------------------------------------------------------------------
    if not args.no_pisa:
        try:
            pisa_rows(args, syn, q_rows, gt_sparse, add)
        except Exception as err:  # keep the other numbers
            print(f"pisa failed: {err!r}", file=sys.stderr)
            info["pisa_error"] = repr(err)

    # ---- Milvus Lite ------------------------------------------------------------------------
    if not args.no_milvus:
        try:
            milvus_rows(args, syn, q_rows, gt_dense, gt_sparse, gt_hybrid, add)
        except Exception as err:  # keep the sdray numbers
            print(f"milvus failed: {err!r}", file=sys.stderr)
            info["milvus_error"] = repr(err)
    return info, rows


def milvus_rows(args, syn, q_rows, gt_dense, gt_sparse, gt_hybrid, add):
    from pymilvus import AnnSearchRequest, DataType, MilvusClient, WeightedRanker

    n, k = len(syn.dense), args.k
    tmp = tempfile.mkdtemp(prefix="milvus-bench-")
    try:
        client = MilvusClient(os.path.join(tmp, "bench.db"))
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=syn.dense.shape[1])
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        ip = client.prepare_index_params()
        ip.add_index(field_name="dense", index_type="FLAT", metric_type="IP")
        ip.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        client.create_collection("docs", schema=schema, index_params=ip)
        sp = syn.sparse
        t = time.time()
        for a in range(0, n, 5000):
            b = min(n, a + 5000)
            batch = [
                {"id": i, "dense": syn.dense[i].tolist(),
                 "sparse": dict(zip(sp.indices[sp.indptr[i]:sp.indptr[i + 1]].tolist(), sp.values[sp.indptr[i]:sp.indptr[i + 1]].tolist()))}
                for i in range(a, b)
            ]
            client.insert("docs", batch)
        client.load_collection("docs")
        build = time.time() - t
        size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(tmp) for f in fs)
        m = args.milvus_queries
        q_rows, gt_dense, gt_sparse, gt_hybrid = q_rows[:m], gt_dense[:m], gt_sparse[:m], gt_hybrid[:m]
        qs = [dict(zip(q.indices.tolist(), q.values.tolist())) for q in q_rows]
        ids = lambda res: [h["id"] for h in res[0]]  # noqa: E731
        tm, res = timed(lambda q: ids(client.search("docs", data=[q], anns_field="sparse", limit=k, search_params={"metric_type": "IP"})), qs)
        add("Milvus Lite", "sparse", "-", build, size, tm, recall(res, gt_sparse), "SPARSE_INVERTED_INDEX; build = insert+load of both fields; Python engine")
        tm, res = timed(lambda q: ids(client.search("docs", data=[q.tolist()], anns_field="dense", limit=k, search_params={"metric_type": "IP"})), syn.q_dense[:m])
        add("Milvus Lite", "dense", "-", None, size, tm, recall(res, gt_dense), "FLAT IP")
        for kp in args.milvus_kprime:
            for norm in (True, False):
                def hyb(i, kp=kp, norm=norm):
                    reqs = [
                        AnnSearchRequest(data=[syn.q_dense[i].tolist()], anns_field="dense", param={"metric_type": "IP"}, limit=kp),
                        AnnSearchRequest(data=[qs[i]], anns_field="sparse", param={"metric_type": "IP"}, limit=kp),
                    ]
                    return ids(client.hybrid_search("docs", reqs, WeightedRanker(W1 / TAU, W2, norm_score=norm), limit=k))
                tm, res = timed(hyb, range(len(qs)))
                add("Milvus Lite", "hybrid", "-", None, None, tm, recall(res, gt_hybrid), f"k'={kp} WeightedRanker norm_score={norm}")
        client.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _toks(indices, values, scale):
    """Term -> integer impact round(w * scale) as PISA's pre-tokenised input; zero impacts dropped."""
    q = np.rint(values * scale)
    return {f"t{t}": float(v) for t, v in zip(indices.tolist(), q.tolist()) if v > 0}


def pisa_rows(args, syn, q_rows, gt_sparse, add):
    """PISA (Mallia et al., OSIRRC 2019) through pyterrier-pisa: toks_indexer + "quantized" scorer + block_max_wand.

    Two latency rows: the PyTerrier transformer (a one-row DataFrame per query, what a user calls)
    and the engine call under it (pyterrier_pisa._pisathon.retrieve, no pandas).
    """
    import pandas as pd
    from pyterrier_pisa import PisaIndex, _pisathon

    n, k, scale, sp = len(syn.sparse), args.k, float(args.pisa_scale), syn.sparse
    tmp = tempfile.mkdtemp(prefix="pisa-bench-")
    try:
        path = os.path.join(tmp, "pisa")
        t = time.time()
        docs = ({"docno": str(i), "toks": _toks(*sp.row(i), scale)} for i in range(n))
        idx = PisaIndex(path, stemmer="none", stops="none", threads=1)
        idx.toks_indexer(scale=1.0).index(docs)
        retr = idx.quantized(num_results=k, threads=1, query_algorithm="block_max_wand", toks_scale=1.0)  # compresses + block maxima
        build = time.time() - t
        files = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}
        inv = sum(v for f, v in files.items() if f.startswith("inv."))  # uncompressed postings, not searched
        search_bytes = sum(files.values()) - inv
        post, bmw = (sum(v for f, v in files.items() if f.endswith(e)) for e in (f".{idx.index_encoding.value}", ".bmw.64"))
        qs = [_toks(q.indices, q.values, scale) for q in q_rows]
        frames = [pd.DataFrame([{"qid": "q", "query_toks": q}]) for q in qs]
        tm, res = timed(lambda f: retr(f)["docno"].astype(int).tolist(), frames)
        setting = (f"block_max_wand, quantized scorer, impacts=round(w*{scale:g}), {idx.index_encoding.value}, block 64 "
                   f"({post / n:.0f} B/doc postings + {bmw / n:.0f} block maxima + lexicons); build = Python inversion + compress, 1 thread; "
                   f"+{inv / n:.0f} B/doc uncompressed inv.*")
        add("PISA (pyterrier-pisa)", "sparse", 1, build, search_bytes, tm, recall(res, gt_sparse), setting + "; PyTerrier transformer")

        out = (np.empty(k, np.int32), np.empty(k, object), np.empty(k, np.int32), np.empty(k, np.float32))

        def engine(q):
            m = _pisathon.retrieve(retr._ctxt, "block_max_wand", [(0, q)], k=k, threads=1, query_weighted=1, pretokenised=True,
                                   result_qidxs=out[0], result_docnos=out[1], result_ranks=out[2], result_scores=out[3])
            return [int(d) for d in out[1][:m]]

        tm, res = timed(engine, qs)
        add("PISA (pyterrier-pisa)", "sparse", 1, None, search_bytes, tm, recall(res, gt_sparse), "engine call (_pisathon.retrieve), no pandas")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fmt(x, d=2):
    return "" if x is None else (f"{x:,.{d}f}" if isinstance(x, float) else str(x))


def markdown(rows) -> str:
    lines = ["| system | part | threads | build docs/s | bytes/doc | p50 ms | p99 ms | recall@10 | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['part']} | {r['threads']} | {_fmt(r['build_docs_per_s'], 0)} | "
                     f"{_fmt(r['bytes_per_doc'], 0)} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | "
                     f"{_fmt(r['recall@10'], 3)} | {r['note']} |")
    return "\n".join(lines)


def _fastest(rows, system, part, min_recall=0.0):
    """The lowest-p50 row of one peer system and part (at ``min_recall`` or above), or None."""
    ok = [r for r in rows if r["system"] == system and r["part"] == part and r["p50_ms"] is not None
          and r["recall@10"] >= min_recall]
    return min(ok, key=lambda r: r["p50_ms"], default=None)


def ratios(rows, min_recall=0.95) -> str:
    """Side-by-side ratios: each peer's fastest p50 (at recall@10 >= ``min_recall``) over sdray's."""
    peers = sorted({r["system"] for r in rows if not r["system"].startswith("sdray")})
    lines = [f"\nRatios: peer p50 / sdray p50 (> 1: sdray faster); fastest row of each at recall@10 >= {min_recall}"
             " (a peer that never gets there: its most accurate row, recall shown)",
             "| part | sdray row | sdray p50 ms | " + " | ".join(f"{p} p50 ms | ratio" for p in peers) + " |",
             "|---|---|---|" + "---|---|" * len(peers)]
    for part in ("sparse", "dense", "hybrid"):
        mine = sorted({r["system"] for r in rows if r["system"].startswith("sdray") and r["part"] == part})
        for system in mine:
            best = _fastest(rows, system, part, min_recall)
            if best is None:
                continue
            cells = []
            for peer in peers:
                other = _fastest(rows, peer, part, min_recall)
                note = ""
                if other is None:  # the peer never reaches the recall: its most accurate row
                    ok = [r for r in rows if r["system"] == peer and r["part"] == part and r["p50_ms"]]
                    other = max(ok, key=lambda r: r["recall@10"], default=None)
                    note = "" if other is None else f" (recall {other['recall@10']:.2f})"
                cells.append("|" if other is None else
                             f"{other['p50_ms']:.2f}{note} | {other['p50_ms'] / best['p50_ms']:.1f}×")
            lines.append(f"| {part} | {system} ({best['threads']} thr, {best['note'].split(';')[0]}) | "
                         f"{best['p50_ms']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _qc_hf(text: str) -> tuple[int, float]:
    qc, hf = text.split(":")
    return int(qc), float(hf)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kprime", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--dense-kinds", nargs="+", default=["flat", "ivf"])
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4*sqrt(n); k-means trains on up to 256 per list)")
    p.add_argument("--query-cut", type=int, default=10)
    p.add_argument("--heap-factor", type=float, default=0.9)
    p.add_argument("--seismic-search", nargs="*", default=[], metavar="QC:HF", type=_qc_hf,
                   help="more Seismic search settings (query_cut:heap_factor) timed on the same index")
    p.add_argument("--sparse-only", action="store_true", help="stop after exact CSR and Seismic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-milvus", action="store_true")
    p.add_argument("--milvus-queries", type=int, default=20, help="Milvus Lite takes seconds per query")
    p.add_argument("--milvus-kprime", type=int, nargs="+", default=[100])
    p.add_argument("--no-pisa", action="store_true")
    p.add_argument("--pisa-scale", type=float, default=100.0, help="PISA integer impact = round(weight * scale)")
    p.add_argument("--json", help="write {info, rows} here")
    args = p.parse_args(argv)
    info, rows = run(args)
    print(markdown(rows))
    print(ratios(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"info": info, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
