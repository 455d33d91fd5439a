"""Driver memory and throughput of the batch jobs as the corpus grows (issue 11).

For each N (image–text pairs) it writes a feature corpus with a fixed seed, exactly as
``sdray featurize`` lays one out (Parquet files with ``sample_id, image_id, caption, input_ids,
text_features, image_features`` at the packaged backbone's dimensions, 384 text / 1280 image, and
a ``manifest.json``), runs the real ``sdray index`` as a subprocess, samples that process's RSS
(the Ray *driver*; Ray's own daemons and workers are other processes) every 0.1 s with psutil,
and times it. Then ``sdray featurize`` runs over ``sdray synth`` image shards with the packaged
backbone at the sizes given. Targets: driver peak RSS at the largest N <= 1.25x the smallest,
docs/s at the largest N >= 0.8x the smallest.

Corpus: two captions per image (N/2 images, N captions, so dedupe does real work), captions
unique, features the same for every copy of an image. The model is the packaged backbone with
its 256-d dense projections and tokenizer, and a random sparse head keeping the top 64 of the
first 1,024 term ids per document (documents still live in the 30,522-term space): the real
head's cost per document is a constant factor measured apart (``--head-cost``), not the job's.
``docs_per_s`` is pairs indexed per second of the whole command (Ray start-up included).

    python benchmarks/scale.py --sizes 100000,300000,1000000 --featurize-sizes 256 --json
    python benchmarks/scale.py --sizes 1000000 --featurize-sizes '' --json > big.json   # one size
    python benchmarks/scale.py --combine small.json big.json --json                    # one table
    python benchmarks/scale.py --sizes 100000 --code /tmp/sdray-old --shards 1         # old job

``--code DIR`` runs the index job of another checkout (e.g. ``git archive main``) through
``PYTHONPATH``, with the same corpora and the shard count the new job chose, for a baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TEXT_DIM, IMAGE_DIM = 384, 1280          # packaged backbone (MiniLM-L6, EfficientNet-Lite0)
CAPTIONS_PER_IMAGE = 2
SPARSE_TERMS = 1024
KEYS = ("n", "driver_peak_rss_mb", "seconds", "docs_per_s")


def make_model(path: str) -> str:
    """The packaged backbone's model (its projections, tokenizer and 30,522-term vocabulary) with a
    random sparse head that is 16 units wide and writes only the first ``SPARSE_TERMS`` term ids
    (top 64 per document), so that encoding costs ~0.4M multiply-adds a document instead of ~12M
    plus elementwise passes over 30,522 outputs: the job's own work is what the run measures."""
    import torch

    from sdray.config import from_dict
    from sdray.heads import RetrieverHeads
    from sdray.model import RetrievalModel

    if not os.path.exists(os.path.join(path, "heads.safetensors")):
        cfg = from_dict({"heads": {"topk_text": 64, "topk_image": 64}})
        model = RetrievalModel.create(cfg)
        assert (model.backbone.text_dim, model.backbone.image_dim) == (TEXT_DIM, IMAGE_DIM)
        text_proj, vision_proj = model.backbone.initial_projections()
        gen = torch.Generator().manual_seed(0)
        emb = torch.randn(SPARSE_TERMS, 16, generator=gen) * 0.5
        heads = RetrieverHeads(text_proj, vision_proj, emb, topk=(64, 64))
        RetrievalModel(cfg, heads, {"method": "untrained", "note": "benchmarks/scale.py"}).save(path)
    return path


def preprocessing() -> dict:
    """The feature signature ``sdray index`` checks (sdray.backbones.compat): the packaged
    backbone's, which :func:`make_model` uses."""
    from sdray.backbones.compat import feature_signature
    from sdray.config import from_dict

    return feature_signature(from_dict({}).backbone)


def make_feature_corpus(folder: str, n: int, seed: int, rows_per_file: int) -> str:
    """``n`` pairs of generated features under ``folder`` (kept and reused when complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as fh:
            meta = json.load(fh)
        if "preprocessing" not in meta:  # written before index checked the feature signature
            with open(manifest, "w") as fh:
                json.dump(meta | {"preprocessing": preprocessing()}, fh)
        return folder
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for f, start in enumerate(range(0, n, rows_per_file)):
        rows = np.arange(start, min(n, start + rows_per_file))
        images = rows // CAPTIONS_PER_IMAGE
        first = np.unique(images, return_index=True)[1]
        img = rng.standard_normal((len(first), IMAGE_DIM), dtype=np.float32)[np.searchsorted(images[first], images)]
        txt = rng.standard_normal((len(rows), TEXT_DIM), dtype=np.float32)
        ids = rng.integers(1000, 30000, (len(rows), 12), dtype=np.int32)
        name = f"shard-{f:05d}"
        table = pa.table({
            "sample_id": pa.array([f"{name}/{r:09d}" for r in rows]),
            "image_id": pa.array([f"img{i:09d}" for i in images]),
            "caption": pa.array([f"generated caption {r} of image {i}" for r, i in zip(rows, images)]),
            "input_ids": pa.ListArray.from_arrays(pa.array(np.arange(0, 12 * len(rows) + 1, 12, dtype=np.int32)),
                                                  pa.array(ids.ravel())),
            "text_features": pa.FixedSizeListArray.from_arrays(pa.array(txt.ravel()), TEXT_DIM),
            "image_features": pa.FixedSizeListArray.from_arrays(pa.array(img.ravel()), IMAGE_DIM),
        })
        path = os.path.join(folder, f"{name}.parquet")
        pq.write_table(table, path, compression="none")
        files.append(path)
    with open(manifest, "w") as fh:
        json.dump({"kind": "sdray.features", "data": "generated", "backbone_name": "packaged",
                   "preprocessing": preprocessing(),
                   "text_dim": TEXT_DIM, "image_dim": IMAGE_DIM, "n_samples": n, "skips": {},
                   "files": files, "generator": {"seed": seed, "captions_per_image": CAPTIONS_PER_IMAGE}}, fh)
    return folder


def run_measured(cmd: list[str], env: dict, log_path: str, interval: float = 0.1,
                 cwd: str = ROOT) -> tuple[float, float, str]:
    """Run ``cmd`` in ``cwd``; (seconds, peak RSS of that process in MiB, stdout)."""
    import psutil

    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=cwd)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(interval)
        out = proc.stdout.read()
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log_path) as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return seconds, peak / 2**20, out


def env_for(code: str | None) -> dict:
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    if code:
        env["PYTHONPATH"] = code + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tag(args) -> str:
    return "old" if args.code else "new"


def index_bytes(out: str) -> tuple[int, int]:
    """(bytes of every shard file of the published version, documents on both sides)."""
    with open(os.path.join(out, "CURRENT.json")) as fh:
        version = json.load(fh)["version"]
    with open(os.path.join(out, version, "manifest.json")) as fh:
        manifest = json.load(fh)
    total = sum(f["bytes"] for s in manifest["shards"] for side in s["sides"].values() for f in side["files"].values())
    docs = sum(side["count"] for side in manifest["sides"].values())
    return total, docs


def bench_index(n: int, args, work: str, model: str) -> dict:
    corpus = make_feature_corpus(os.path.join(work, f"features-{n}-s{args.seed}"), n, args.seed, args.rows_per_file)
    out = tempfile.mkdtemp(prefix=f"index-{n}-", dir=work)
    cmd = [sys.executable, "-m", "pipelines.cli", "index", "--model", model, "--corpus", corpus, "--out", out,
           "--batch-size", str(args.batch_size), "--config", args.config_file, "--json"]
    if args.shards:
        cmd += ["--shards", str(args.shards)]
    elif args.max_docs_per_shard:
        cmd += ["--max-docs-per-shard", str(args.max_docs_per_shard)]
    seconds, peak, stdout = run_measured(cmd, env_for(args.code), os.path.join(work, f"index-{n}-{tag(args)}.log"),
                                         cwd=args.code or ROOT)
    summary = json.loads(stdout.strip().splitlines()[-1])
    nbytes, docs = index_bytes(out)
    if not args.keep:
        subprocess.run(["rm", "-rf", out], check=True)
    return {"n": n, "driver_peak_rss_mb": round(peak, 1), "seconds": round(seconds, 2),
            "docs_per_s": round(n / seconds, 1), "shards": summary["shards"], "documents": docs,
            "index_bytes": nbytes, "bytes_per_doc": round(nbytes / max(docs, 1), 1),
            "code": tag(args)}


def bench_featurize(n: int, args, work: str) -> dict:
    data = os.path.join(work, f"synth-{n}-s{args.seed}")
    if not os.path.exists(os.path.join(data, "synth.json")):
        subprocess.run([sys.executable, "-m", "pipelines.cli", "synth", "--out", data, "--n", str(n), "--splits", "train",
                        "--captions-per-image", "1",
                        "--seed", str(args.seed)], check=True, cwd=ROOT, env=env_for(None),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tempfile.mkdtemp(prefix=f"features-{n}-", dir=work)
    cmd = [sys.executable, "-m", "pipelines.cli", "featurize", "--data", os.path.join(data, "train"), "--out", out]
    seconds, peak, _ = run_measured(cmd, env_for(args.code), os.path.join(work, f"featurize-{n}-{tag(args)}.log"),
                                    cwd=args.code or ROOT)
    subprocess.run(["rm", "-rf", out], check=True)
    return {"n": n, "driver_peak_rss_mb": round(peak, 1), "seconds": round(seconds, 2),
            "docs_per_s": round(n / seconds, 2), "code": tag(args)}


def head_cost(threads: int = 1, n: int = 1024) -> dict:
    """Documents/s of the packaged model's real heads (384-wide sparse head, 30,522 outputs) on
    ``threads`` threads: the per-document encoding cost the cost model adds to the job's."""
    import torch

    from sdray.config import from_dict
    from sdray.model import RetrievalModel

    torch.set_num_threads(threads)
    heads = RetrievalModel.create(from_dict({"heads": {"topk_text": 256, "topk_image": 256}})).heads.eval()
    x_img, x_txt = torch.randn(n, IMAGE_DIM), torch.randn(n, TEXT_DIM)
    with torch.no_grad():
        heads.encode_image(x_img[:64])
        t0 = time.perf_counter()
        heads.encode_image(x_img)
        heads.encode_text(x_txt)
        seconds = time.perf_counter() - t0
    return {"threads": threads, "docs_per_s": round(2 * n / seconds, 1)}


def ratios(rows: list[dict]) -> dict:
    if len(rows) < 2:
        return {}
    rows = sorted(rows, key=lambda r: r["n"])
    lo, hi = rows[0], rows[-1]
    return {"rss_largest_over_smallest": round(hi["driver_peak_rss_mb"] / lo["driver_peak_rss_mb"], 3),
            "docs_per_s_largest_over_smallest": round(hi["docs_per_s"] / lo["docs_per_s"], 3)}


def print_table(result: dict) -> None:
    for job in ("index", "featurize"):
        rows = sorted(result.get(job, []), key=lambda r: r["n"])
        if not rows:
            continue
        print(f"\n{job}: {'N':>9} {'driver peak RSS MiB':>20} {'seconds':>9} {'pairs/s':>9}"
              + (f" {'shards':>6} {'bytes/doc':>9}" if all("shards" in r for r in rows) else ""))
        for r in rows:
            extra = f" {r['shards']:>6} {r['bytes_per_doc']:>9.0f}" if "shards" in r else ""
            print(f"{'':{len(job) + 1}} {r['n']:>9} {r['driver_peak_rss_mb']:>20.1f} {r['seconds']:>9.1f} "
                  f"{r['docs_per_s']:>9.1f}{extra}")
        rat = ratios(rows)
        if rat:
            print(f"{'':{len(job) + 1}} largest/smallest: RSS {rat['rss_largest_over_smallest']:.2f}x (target <= 1.25), "
                  f"pairs/s {rat['docs_per_s_largest_over_smallest']:.2f}x (target >= 0.8)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,300000,1000000", help="index corpus sizes (pairs)")
    p.add_argument("--featurize-sizes", default="256", help="featurize sizes (images); '' to skip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sdray-scale"))
    p.add_argument("--rows-per-file", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=2048, help="index encoder batch size")
    p.add_argument("--max-docs-per-shard", type=int, default=None, help="default: the index config's")
    p.add_argument("--shards", type=int, default=None, help="fixed shard count (the old job needs one)")
    p.add_argument("--code", default=None, help="run another checkout's jobs (PYTHONPATH), e.g. old main")
    p.add_argument("--sparse", default="exact", choices=["exact", "seismic"],
                   help="sparse index kind (exact: measure the pipeline, not Seismic's build)")
    p.add_argument("--keep", action="store_true", help="keep the built indexes")
    p.add_argument("--head-cost", action="store_true",
                   help="also time the real packaged heads (documents/s on one thread)")
    p.add_argument("--combine", nargs="*", default=None, help="merge the last JSON lines of earlier runs")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    if args.combine is not None:
        result: dict = {"index": [], "featurize": []}
        for path in args.combine:
            with open(path) as fh:
                part = json.loads(fh.read().strip().splitlines()[-1])
            for job in result:
                result[job] += part.get(job, [])
    else:
        os.makedirs(args.workdir, exist_ok=True)
        args.config_file = os.path.join(args.workdir, f"index-{args.sparse}.json")
        with open(args.config_file, "w") as fh:
            json.dump({"sparse": {"kind": args.sparse}, "dense": {"kind": "flat"}}, fh)
        model = make_model(os.path.join(args.workdir, "model"))
        result = {"index": [], "featurize": []}
        for n in [int(x) for x in args.sizes.split(",") if x]:
            result["index"].append(bench_index(n, args, args.workdir, model))
            print(f"index n={n}: {result['index'][-1]}", file=sys.stderr, flush=True)
        for n in [int(x) for x in args.featurize_sizes.split(",") if x]:
            result["featurize"].append(bench_featurize(n, args, args.workdir))
            print(f"featurize n={n}: {result['featurize'][-1]}", file=sys.stderr, flush=True)
        if args.head_cost:
            print(f"packaged heads (real): {head_cost()} documents/s", flush=True)
    print_table(result)
    if args.json:  # DESIGN.md §4: exactly these keys (shards and bytes/doc are in the table above)
        print(json.dumps({job: [{k: r[k] for k in KEYS} for r in result[job]] for job in ("index", "featurize")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
