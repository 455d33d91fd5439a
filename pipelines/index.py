"""``sdray index --model URI --corpus URI --out URI [--shards N | --max-docs-per-shard M]``:
build a sharded hybrid index with no per-document state in the driver.

The Ray job around the pure index library (:mod:`sdray.index`):

1. **size** — the shard count ``N`` is ``--shards``, else ``ceil(samples / max_docs_per_shard)``
   with the sample count from Parquet footers or the featurize manifest, or estimated from a few
   tar shards (:mod:`pipelines.corpus_size`). A side never has more documents than samples, so a
   shard holds at most ``max_docs_per_shard`` documents on average (hash routing: the largest is
   within a few square roots of that of the mean; fewer when the corpus has duplicates).
2. **encode** — Ray Data reads the corpus once (raw WebDataset/Parquet image–text shards through
   the shared reader, bad samples skipped and counted per reason; or feature shards from
   ``sdray featurize``) into an actor pool (backbone + trained heads; GPU when the cluster has
   one). Each sample yields an image document (id = ``image_id``) and a caption document (id = a
   hash of the exact text). A document's ``doc_no`` is a 63-bit hash of its id and it belongs to
   shard ``doc_no % N`` (:func:`sdray.index.build.doc_hash`), so every copy of a document lands
   in the same shard. Documents of shards already built are dropped before encoding, and copies
   within one batch are encoded once (the smallest ``sample_id`` kept).
3. **build** — a hash shuffle on the shard number (``groupby(shard).map_groups``: Ray's own data
   movement, spilling to disk as needed) hands each shard's encoded rows to one task. It
   deduplicates them exactly (representative = smallest ``sample_id``, as before), turns the
   Arrow columns into arrays (no per-row Python objects for vectors), builds the FAISS dense index,
   the Seismic or exact CSR sparse index and the metadata, and saves them under
   ``OUT/<version>/shard-XXXXX/{images,captions}/`` (``shard.json`` last = shard complete). The
   driver receives one small record per shard.
4. **publish** — vocabulary, manifest, then ``OUT/CURRENT.json`` (the library's atomic publish).

An interrupted build leaves ``CURRENT.json`` untouched; running the same command again resumes the
pending version (``OUT/_building.json``, keyed by model, corpus listing, config, sides and shard
count): complete shards are kept and their documents are not re-encoded.

Image rows' ``uri`` is ``<corpus shard uri>#<key>`` for raw corpora (what ``serve/images.py``
reads); for feature corpora it points at the raw shard named by the feature manifest, else empty.
Both sides keep the source ``url`` (img2dataset's) when the corpus has one, and ``image_loc``, where
the image bytes sit in the shard (:mod:`sdray.data.locations`), so a thumbnail reads only them. Captions carry the
``image_id``, ``uri`` and ``url`` of their representative sample.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipelines.datasets import is_feature_dir
from sdray import storage
from sdray.progress import Progress

SIDES = ("images", "captions")
STATUS_THREADS = 16


def caption_id(caption: str) -> str:
    """Stable document id of a caption (exact text)."""
    return "c" + hashlib.sha1(caption.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- corpus kind

def feature_sources(uri: str) -> dict[str, str]:
    """Raw shard URI by shard name, from the featurize manifest of ``uri`` or, for one split of a
    featurize output (``OUT/test``), of its parent (``{}`` when absent/ambiguous).

    One entry per input file (bounded by the file count, not the document count)."""
    from sdray.data.formats import shard_name

    split = uri.rstrip("/")
    for root in (split, split.rsplit("/", 1)[0]):
        try:
            m = storage.read_json(storage.join(root, "manifest.json"))
        except FileNotFoundError:
            continue
        shards = (m.get("shards") or {}) if isinstance(m, dict) else {}
        names: dict[str, list[str]] = {}
        for raw, info in shards.items():
            info = info or {}
            if root != split and not str(info.get("output", "")).startswith(split + "/"):
                continue        # the parent's manifest: only this split's shards
            names.setdefault(info.get("shard_id") or shard_name(raw), []).append(raw)
        return {n: v[0] for n, v in names.items() if len(v) == 1}
    return {}


def corpus_files(corpus: str, features: bool) -> list[str]:
    from pipelines.datasets import feature_files, list_shards

    return feature_files(corpus) if features else list_shards(corpus)


def corpus_listing_digest(files: list[str]) -> str:
    """Hash of the corpus files and their sizes (changes when the corpus does)."""
    from pipelines.corpus_size import file_sizes

    digest = hashlib.sha256()
    for uri, size in sorted(file_sizes(files).items()):
        digest.update(f"{uri}\0{size}\0".encode("utf-8"))
    return digest.hexdigest()


def shard_count(corpus: str, features: bool, max_docs_per_shard: int, data_cfg) -> tuple[int, int, bool]:
    """``(N, samples, exact)``: shards for a corpus of ``samples`` at ``max_docs_per_shard``."""
    from pipelines.corpus_size import feature_corpus_size, raw_corpus_size

    size = feature_corpus_size(corpus) if features else raw_corpus_size(corpus, data_cfg)
    return max(1, math.ceil(size.rows / max_docs_per_shard)), size.rows, size.exact


# ----------------------------------------------------------------------------- Ray stages

class Encoder:
    """Actor: model (backbone + heads). Encodes one batch of samples into documents of pending shards.

    Input columns: ``sample_id, image_id, caption``, optional ``url`` and ``image_loc``, and either ``image_features, text_features``
    (feature shards) or ``pixels, input_ids, attention_mask, key, shard`` (decoded raw shards).
    Output (one pyarrow table): ``shard, side, doc_no, id, sample_id, image_id, caption, uri, url, image_loc``,
    ``dense`` (fixed_size_list<float32>[D]), ``sp_idx`` (list<int32>, increasing) and ``sp_val``.
    """

    def __init__(self, model_uri: str, n_shards: int, pending: list[int], sides: tuple[str, ...],
                 sources: dict[str, str] | None = None, tally=None, use_gpu: bool = False,
                 threads: int | None = None):
        import torch

        from sdray.model import RetrievalModel

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = RetrievalModel.load(model_uri)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.heads.to(self.device).eval()
        self._backbone_on_device = False
        self.n_shards = int(n_shards)
        self.pending = np.zeros(self.n_shards, bool)
        self.pending[list(pending)] = True
        self.sides = tuple(sides)
        self.sources = sources or {}
        self.tally = tally
        self.dense_dim = int(self.model.heads.text_proj.linear.out_features)

    def _backbone(self):
        bb = self.model.backbone
        if not self._backbone_on_device:
            bb.to(self.device).eval()
            self._backbone_on_device = True
        return bb

    def _select(self, ids: list[str], sids: list[str]) -> tuple[list[int], list[int]]:
        """Rows to encode (one per distinct id of a pending shard, smallest sample_id) and their hashes."""
        from sdray.index.build import doc_hash

        best: dict[str, int] = {}
        hashes: dict[str, int] = {}
        for i, (d, s) in enumerate(zip(ids, sids)):
            if d not in hashes:
                hashes[d] = doc_hash(d)
            if not self.pending[hashes[d] % self.n_shards]:
                continue
            j = best.get(d)
            if j is None or s < sids[j]:
                best[d] = i
        rows = sorted(best.values())
        return rows, [hashes[ids[i]] for i in rows]

    def _uris(self, batch: dict, sids: list[str]) -> list[str | None]:
        """``<raw shard uri>#<key>`` per row: raw rows carry both; feature rows name their shard
        by its id (the longest known prefix of the sample_id, as ids and keys may hold ``/``)."""
        from pipelines.datasets import split_sample_id

        if "shard" in batch and "key" in batch:
            return [f"{sh}#{key}" if key else None for sh, key in zip(batch["shard"], batch["key"])]
        out = []
        for sid in sids:
            name, key = split_sample_id(sid, self.sources)
            out.append(f"{self.sources[name]}#{key}" if name is not None and key else None)
        return out

    def _features(self, batch: dict, side: str, rows: list[int]):
        torch = self.torch
        col = "image_features" if side == "images" else "text_features"
        if col in batch:
            x = np.stack([np.asarray(batch[col][i], np.float32) for i in rows])
            return torch.as_tensor(x, device=self.device)
        sel = np.asarray(rows, np.int64)
        if side == "images":
            px = torch.as_tensor(np.asarray(batch["pixels"])[sel], device=self.device)
            return self._backbone().pixel_features(px)
        ids = torch.as_tensor(np.asarray(batch["input_ids"])[sel], dtype=torch.long, device=self.device)
        mask = torch.as_tensor(np.asarray(batch["attention_mask"])[sel], dtype=torch.long, device=self.device)
        return self._backbone().token_features(ids, mask)

    def __call__(self, batch: dict):
        import pyarrow as pa

        sids = [str(x) for x in batch["sample_id"]]
        if self.tally is not None and sids:
            self.tally.add({"samples": len(sids)})
        iids = [str(x) for x in batch["image_id"]]
        caps = [str(x) for x in batch["caption"]]
        uris = self._uris(batch, sids)
        urls = _optional_strings(batch, "url", len(sids))
        locs = _optional_strings(batch, "image_loc", len(sids))
        tables = []
        with self.torch.no_grad():
            for side in self.sides:
                ids = iids if side == "images" else [caption_id(c) for c in caps]
                rows, hashes = self._select(ids, sids)
                if not rows:
                    continue
                heads = self.model.heads
                feats = self._features(batch, side, rows)
                enc = heads.encode_image(feats) if side == "images" else heads.encode_text(feats)
                tables.append(self._table(side, rows, hashes, ids, sids, iids, caps, uris, urls, locs, enc))
        return pa.concat_tables(tables) if tables else self._table("images", [], [], [], [], [], [], [], [], [], None)

    def _table(self, side, rows, hashes, ids, sids, iids, caps, uris, urls, locs, enc):
        """One side's encoded rows as a pyarrow table (sparse terms straight from ``nonzero``)."""
        import pyarrow as pa

        n = len(rows)
        if enc is None:
            dense = np.zeros((0, self.dense_dim), np.float32)
            offsets, cols, vals = np.zeros(1, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
        else:
            dense = enc.dense.float().cpu().numpy().astype(np.float32)
            sp = enc.sparse.float()
            nz = self.torch.nonzero(sp)                      # (nnz, 2), row-major: increasing term ids
            vals = sp[nz[:, 0], nz[:, 1]].cpu().numpy().astype(np.float32)
            cols = nz[:, 1].cpu().numpy().astype(np.int32)
            per_row = np.bincount(nz[:, 0].cpu().numpy(), minlength=n)
            offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
        hashes_np = np.asarray(hashes, np.int64)
        return pa.table({
            "shard": pa.array(hashes_np % self.n_shards, pa.int64()),
            "side": pa.array([side] * n, pa.string()),
            "doc_no": pa.array(hashes_np, pa.int64()),
            "id": pa.array([ids[i] for i in rows], pa.string()),
            "sample_id": pa.array([sids[i] for i in rows], pa.string()),
            "image_id": pa.array([iids[i] for i in rows], pa.string()),
            "caption": pa.array([caps[i] for i in rows], pa.string()),
            "uri": pa.array([uris[i] for i in rows], pa.string()),
            "url": pa.array([urls[i] for i in rows], pa.string()),
            "image_loc": pa.array([locs[i] for i in rows], pa.string()),
            "dense": pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1), pa.float32()), self.dense_dim),
            "sp_idx": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(cols, pa.int32())),
            "sp_val": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(vals, pa.float32())),
        })


def _optional_strings(batch: dict, column: str, n: int) -> list[str | None]:
    """``batch[column]`` as strings (``""`` -> ``None``); ``n`` ``None`` when the column is absent."""
    if column not in batch:
        return [None] * n
    return [None if v is None or v == "" else str(v) for v in batch[column]]


def build_one_shard(shard: int, tables: dict, *, out: str, version: str, config: dict, n_shards: int,
                    sides: tuple[str, ...], vocab_size: int, dense_dim: int) -> dict:
    """Build and save shard ``shard`` (every side) from its encoded rows; returns ``{side: info}``."""
    from sdray.index import IndexConfig, build_shard
    from sdray.index.build import shard_data_from_rows

    cfg = IndexConfig.model_validate(config)
    data = {side: shard_data_from_rows(tables.get(side), n_shards, vocab_size, dense_dim) for side in sides}
    return build_shard(out, version, shard, data, cfg)


def _build_group(table, *, out, version, config, n_shards, sides, vocab_size, dense_dim, threads):
    """``map_groups`` body: one shard's encoded rows (every side) -> its files; one summary row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if threads:
        import torch

        torch.set_num_threads(threads)
    shard = int(table.column("shard")[0].as_py())
    tables = {side: table.filter(pc.equal(table.column("side"), side)) for side in sides}
    t0 = time.time()
    infos = build_one_shard(shard, tables, out=out, version=version, config=config, n_shards=n_shards,
                            sides=sides, vocab_size=vocab_size, dense_dim=dense_dim)
    return pa.table({"shard": pa.array([shard], pa.int64()), "info": pa.array([json.dumps(infos)]),
                     "seconds": pa.array([time.time() - t0])})


# ----------------------------------------------------------------------------- the job

class Interrupted(RuntimeError):
    """Raised by the ``interrupt_after`` test hook (simulates a driver killed mid-build)."""


def _shard_status(out: str, version: str, n_shards: int, sides: tuple[str, ...]) -> dict[int, dict | None]:
    from sdray.index import manifest as mf

    with ThreadPoolExecutor(STATUS_THREADS) as pool:
        done = list(pool.map(lambda s: mf.shard_done(out, version, s, sides), range(n_shards)))
    return dict(enumerate(done))


def run_index(model_uri: str, corpus: str, out: str, shards: int | None = None, config: Any = None, *,
              max_docs_per_shard: int | None = None, num_actors: int = 1, batch_size: int = 64,
              use_gpu: bool | None = None, num_gpus_per_actor: float = 1.0, threads: int | None = None,
              sides: tuple[str, ...] = SIDES,
              progress: bool = True, interrupt_after: int | None = None) -> dict:
    """Run the index job; returns a summary (version, counts, shards built/reused, skips, timings).

    ``shards``: the shard count (default: from the corpus size and ``max_docs_per_shard``, itself
    defaulting to the config's). ``config``: an :class:`~sdray.index.IndexConfig` (or dict).
    ``interrupt_after``: test hook, raise :class:`Interrupted` after that many shards were built.
    """
    import ray

    from pipelines.datasets import SkipCounter, ensure_ray, read_features, read_image_text, retry_shard_tasks
    from sdray.evaluation import fusion_params
    from sdray.index import IndexConfig, manifest as mf
    from sdray.model import RetrievalModel

    t_start = time.time()
    timings: dict[str, float] = {}
    log = logging.getLogger("pipelines.index").info if progress else (lambda msg: None)
    if shards is not None and shards < 1:
        raise ValueError("--shards must be >= 1")
    sides = tuple(s for s in SIDES if s in sides)
    if not sides:
        raise ValueError(f"sides must name some of {SIDES}")
    cfg = config if isinstance(config, IndexConfig) else IndexConfig.model_validate(config or {})
    if max_docs_per_shard is not None:
        cfg = cfg.model_copy(update={"max_docs_per_shard": int(max_docs_per_shard)})
        IndexConfig.model_validate(cfg.model_dump())
    storage.check_access(corpus)
    storage.check_access(out, write=True)
    model = RetrievalModel.load(model_uri)
    vocab = list(model.vocabulary)
    dense_dim = int(model.heads.text_proj.linear.out_features)
    fusion = fusion_params(model.config, model.tau)
    features = is_feature_dir(corpus)
    if features:
        from sdray.backbones.compat import check_feature_uri

        if not check_feature_uri(corpus, model.config.backbone, f"the model's config ({model_uri})"):
            log(f"warning: {corpus} has no featurize manifest; its backbone cannot be checked")
    data_cfg = model.config.data.model_copy(update={"shuffle_files": False})
    preprocessor = None if features else model.preprocessor
    del model
    log(f"corpus {corpus}: {'feature' if features else 'raw image-text'} shards; model {model_uri}")

    ensure_ray()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(num_actors, 1))

    # 1. shard count and version (resume an interrupted build with the same inputs) ----------
    t0 = time.time()
    estimate = None
    if shards is None:
        shards, est_rows, exact = shard_count(corpus, features, cfg.max_docs_per_shard, data_cfg)
        estimate = {"samples": est_rows, "exact": exact}
        log(f"{'' if exact else '~'}{est_rows} samples -> {shards} shards of <= {cfg.max_docs_per_shard} documents")
    files = corpus_files(corpus, features)
    if not files:
        raise FileNotFoundError(f"no shards under {corpus}")
    fp = mf.fingerprint({"model": model_uri, "corpus": corpus, "config": cfg.model_dump(), "shards": shards,
                         "sides": list(sides), "files": corpus_listing_digest(files)})
    version, resumed = mf.begin_build(out, fp)
    done = _shard_status(out, version, shards, sides) if resumed else dict.fromkeys(range(shards))
    pending = [s for s in range(shards) if done[s] is None]
    timings["plan_s"] = round(time.time() - t0, 3)
    log(f"version {version}" + (" (resuming)" if resumed else "") +
        f": {shards - len(pending)}/{shards} shards already built, {len(pending)} to build")

    infos: dict[int, dict] = {s: i for s, i in done.items() if i is not None}
    built: list[int] = []
    samples: int | None = None
    skips: dict[str, int] = {}
    encoded_n = {side: 0 for side in sides}
    if pending:
        # 2. encode (actor pool) -> 3. shuffle by shard, build each shard in one task ---------
        t0 = time.time()
        tally = SkipCounter.create()
        counter = None if features else SkipCounter.create()
        if features:
            ds = read_features(corpus)
            names = ds.schema().names                  # feature shards written before url/image_loc: none
            ds = ds.select_columns(["sample_id", "image_id", "caption", "image_features", "text_features"]
                                   + [c for c in ("url", "image_loc") if c in names])
        else:
            ds = read_image_text(corpus, data_cfg, preprocessor, counter=counter).select_columns(
                ["sample_id", "image_id", "caption", "key", "url", "image_loc", "shard", "pixels",
                 "input_ids", "attention_mask"])
        retry_shard_tasks(ds, storage.retry_config())
        # this job's S3 and retry settings reach its actors and tasks even on a cluster started
        # with others
        env = {"runtime_env": {"env_vars": storage.s3_env()}} if storage.s3_env() else {}
        encoded = ds.map_batches(
            Encoder, fn_constructor_kwargs={
                "model_uri": model_uri, "n_shards": shards, "pending": pending, "sides": sides,
                "sources": feature_sources(corpus) if features else None, "tally": tally,
                "use_gpu": use_gpu, "threads": None if use_gpu else threads},
            batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=num_gpus_per_actor if use_gpu else 0, num_cpus=1, **env)
        results = encoded.groupby("shard", num_partitions=min(len(pending), 256)).map_groups(
            _build_group, fn_kwargs={"out": out, "version": version, "config": cfg.model_dump(),
                                     "n_shards": shards, "sides": sides, "vocab_size": len(vocab),
                                     "dense_dim": dense_dim, "threads": None if use_gpu else threads},
            batch_format="pyarrow", **env)
        bar = Progress("index", len(pending), "shards", enabled=None if progress else False)
        for row in results.iter_rows():
            s = int(row["shard"])
            infos[s] = json.loads(row["info"])
            built.append(s)
            for side in sides:
                encoded_n[side] += int(infos[s][side]["count"])
            bar.update(1, postfix=f"shard {s} built in {row['seconds']:.1f}s")
            if interrupt_after is not None and len(built) >= interrupt_after:
                raise Interrupted(f"interrupted after {len(built)} shards (test hook)")
        bar.close()
        samples = int(tally.counts().get("samples", 0))
        tally.close()
        if counter is not None:
            skips = counter.counts()
            counter.close()
        if not samples:
            raise ValueError(f"no valid samples in {corpus}")
        timings["encode_build_s"] = round(time.time() - t0, 3)
        for s in pending:  # shards that received no document at all
            if s not in infos:
                infos[s] = build_one_shard(s, {}, out=out, version=version, config=cfg.model_dump(),
                                           n_shards=shards, sides=sides, vocab_size=len(vocab), dense_dim=dense_dim)
                built.append(s)
                log(f"shard {s} is empty ({len(infos)}/{shards} shards)")
        log(f"{samples} valid samples" + (f"; skipped {sum(skips.values())} ({skips})" if skips else ""))

    # 4. publish -------------------------------------------------------------------------------
    mf.write_atomic(storage.join(out, version, mf.VOCAB), json.dumps(vocab).encode("utf-8"))
    manifest = mf.make_manifest(
        version, [infos[s] for s in range(shards)], model=model_uri, config=cfg.model_dump(), fusion=fusion,
        has_vocab=True, extra={"corpus": corpus, "corpus_kind": "features" if features else "raw",
                               "samples": samples, "skips": skips})
    mf.publish(out, version, manifest)
    timings["total_s"] = round(time.time() - t_start, 3)
    summary = {"version": version, "out": out, "shards": shards, "resumed": resumed,
               "built": sorted(built), "reused": sorted(set(range(shards)) - set(built)),
               "counts": {side: manifest["sides"].get(side, {}).get("count", 0) for side in sides},
               "encoded": encoded_n, "samples": samples, "estimate": estimate, "skips": skips,
               "fusion": fusion, "timings": timings}
    log(f"published {version}: {summary['counts']} in {shards} shards ({timings['total_s']:.1f}s)")
    return summary


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model URI (folder or s3:// prefix)")
    parser.add_argument("--corpus", required=True, help="raw image-text shards or feature shards")
    parser.add_argument("--out", required=True, help="index root (folder or s3:// prefix)")
    parser.add_argument("--shards", type=int, default=None,
                        help="number of index shards (default: from the corpus size and --max-docs-per-shard)")
    parser.add_argument("--max-docs-per-shard", type=int, default=None,
                        help="upper bound of documents per shard side when --shards is not given "
                             "(default: the config's max_docs_per_shard, 200000)")
    parser.add_argument("--config", default=None, help="YAML (or JSON) file of IndexConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="IndexConfig override with a dotted key and a YAML value, e.g. "
                             "--set sparse.kind=exact (repeatable; after --config)")
    parser.add_argument("--sides", default="images,captions",
                        help="which sides to build: images (answers text queries), captions (image queries)")
    parser.add_argument("--num-actors", type=int, default=1, help="encoder actors")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per actor / build task")
    parser.add_argument("--use-gpu", action="store_true", default=None,
                        help="encode on GPU (default: when the cluster has one); IVF indexes are "
                             "trained on a GPU wherever faiss has GPU support and sees one")
    parser.add_argument("--num-gpus-per-actor", type=float, default=1.0,
                        help="GPUs reserved per encoder actor (a fraction packs several on one GPU)")
    parser.add_argument("--dense-index", choices=["auto", "flat", "ivf", "hnsw"], default=None,
                        help="FAISS index kind (default: the config's, auto = flat for small "
                             "shards, IVF from dense.ivf_min_docs documents per shard)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last")


def load_config(path: str | None, sets: list[str] | None = None):
    from pipelines.config_show import apply_sets
    from sdray.index import IndexConfig

    data: dict = {}
    if path:
        import yaml

        data = yaml.safe_load(storage.read_bytes(path).decode("utf-8")) or {}
        if isinstance(data, dict) and "index" in data and set(data) - set(IndexConfig.model_fields):
            data = data["index"]  # a whole SdrayConfig-style file
    return IndexConfig.model_validate(apply_sets(data, sets or []))


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, getattr(args, "set", []))
    if args.dense_index:
        cfg.dense.kind = args.dense_index
    summary = run_index(args.model, args.corpus, args.out, args.shards, cfg,
                        max_docs_per_shard=args.max_docs_per_shard, num_actors=args.num_actors,
                        batch_size=args.batch_size, use_gpu=args.use_gpu,
                        num_gpus_per_actor=args.num_gpus_per_actor, threads=args.threads,
                        sides=tuple(s.strip() for s in args.sides.split(",")))
    print(f"index {summary['out']} version {summary['version']}: {summary['counts'].get('images', 0)} "
          f"images, {summary['counts'].get('captions', 0)} captions in {summary['shards']} shards "
          f"(built {len(summary['built'])}, reused {len(summary['reused'])}) in {summary['timings']['total_s']:.1f}s")
    if args.json:
        print(json.dumps(summary))
    return 0
