"""``sdray index --model URI --corpus URI --out URI [--shards N]``: build a sharded hybrid index.

The Ray job around the pure index library (:mod:`sdray.index`):

1. **keys** — Ray Data reads the corpus (raw WebDataset/Parquet image–text shards, or feature
   shards from ``sdray featurize``) and returns only ``sample_id, image_id, caption`` of every
   valid sample (raw images are decoded once to drop bad ones, counted per reason). The driver
   deduplicates images by ``image_id`` and captions by exact text (DESIGN.md §3; first occurrence
   in ``sample_id`` order), numbers them (``doc_no``, the tie-break) and assigns every document to
   shard ``crc32(id) % N``.
2. **encode** — an actor pool (backbone + trained heads; GPU when the cluster has one) encodes only
   the documents of shards that are not built yet: images from decoded pixels or
   ``image_features``, captions from text or ``text_features``.
3. **build** — ``groupby(shard).map_groups`` builds every shard in parallel (FAISS dense index,
   Seismic or exact CSR sparse index, stored vectors and metadata) and saves it under
   ``OUT/<version>/shard-XXXXX/{images,captions}/`` (``shard.json`` last = shard complete).
4. **publish** — manifest, then ``OUT/CURRENT.json`` (the library's atomic publish).

An interrupted build leaves ``CURRENT.json`` untouched; running the same command again resumes the
pending version (``OUT/_building.json``): complete shards are kept and not re-encoded.

Image rows' ``uri`` is ``<corpus shard uri>#<key>`` for raw corpora (what ``serve/images.py``
reads); for feature corpora it points at the raw shard named by the feature manifest, else empty.
"""

from __future__ import annotations

import argparse
import logging
import functools
import hashlib
import json
import os
import time
from typing import Any

import numpy as np

from pipelines.datasets import is_feature_dir
from sdray import storage
from sdray.progress import Progress

SIDES = ("images", "captions")


def caption_id(caption: str) -> str:
    """Stable document id of a caption (exact text)."""
    return "c" + hashlib.sha1(caption.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- corpus kind

def feature_sources(uri: str) -> dict[str, str]:
    """Raw shard URI by shard name, from a featurize manifest (``{}`` when unknown/ambiguous)."""
    from sdray.data.formats import shard_name

    try:
        m = storage.read_json(storage.join(uri, "manifest.json"))
    except Exception:
        return {}
    names: dict[str, list[str]] = {}
    for raw, info in ((m.get("shards") or {}) if isinstance(m, dict) else {}).items():
        names.setdefault(info.get("shard_id") or shard_name(raw), []).append(raw)
    return {n: v[0] for n, v in names.items() if len(v) == 1}


# ----------------------------------------------------------------------------- Ray stages

def _keys_only(batch: dict) -> dict:
    return {k: np.asarray([str(x) for x in batch[k]], dtype=object) for k in ("sample_id", "image_id", "caption")}


def _plan_rows(batch: dict, *, plan: dict, columns: tuple[str, ...]) -> dict:
    """Keep the rows whose image and/or caption is to be encoded; add ``img_doc``/``cap_doc``."""
    keep, img, cap = [], [], []
    for i, sid in enumerate(batch["sample_id"]):
        p = plan.get(str(sid))
        if p is not None:
            keep.append(i)
            img.append(p[0])
            cap.append(p[1])
    sel = np.asarray(keep, np.int64)
    out = {c: np.asarray(batch[c])[sel] for c in columns}
    out["img_doc"] = np.asarray(img, np.int64)
    out["cap_doc"] = np.asarray(cap, np.int64)
    return out


def _decode_images(batch: dict, *, plan: dict, preprocessor, max_pixels: int) -> dict:
    """Raw rows → ``pixels`` of the images to encode (their ``img_doc``); others dropped."""
    from sdray.data.decode import decode_image

    docs, images = [], []
    for sid, data in zip(batch["sample_id"], batch["image"]):
        doc = plan.get(str(sid))
        if doc is None:
            continue
        im, _ = decode_image(bytes(data), max_pixels, draft_size=preprocessor.image_size)
        if im is None:  # validated in the keys pass; cannot happen unless the shard changed
            continue
        docs.append(doc)
        images.append(im)
    size = preprocessor.image_size
    pixels = np.asarray(preprocessor.images(images), np.float32) if images else np.zeros((0, 3, size, size), np.float32)
    return {"img_doc": np.asarray(docs, np.int64), "pixels": pixels}


class Encoder:
    """Actor: model (backbone + heads). Maps a batch to encoded documents (one pyarrow table).

    Input columns (any combination): ``pixels`` + ``img_doc``; ``caption`` + ``cap_doc`` (raw);
    ``image_features``/``text_features`` + ``img_doc``/``cap_doc`` (feature shards; -1 = skip).
    Output: ``side, doc_no, dense (D), sp_idx, sp_val`` (sparse terms, increasing ids).
    """

    def __init__(self, model_uri: str, use_gpu: bool = False, threads: int | None = None):
        import torch

        from sdray.model import RetrievalModel

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = RetrievalModel.load(model_uri)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.heads.to(self.device).eval()
        self._backbone_on_device = False

    def _backbone(self):
        bb = self.model.backbone
        if not self._backbone_on_device:
            bb.to(self.device).eval()
            self._backbone_on_device = True
        return bb

    def __call__(self, batch: dict):
        import pyarrow as pa

        torch = self.torch
        parts: list[tuple[str, np.ndarray, Any]] = []
        with torch.no_grad():
            if "pixels" in batch and len(batch["pixels"]):
                px = torch.as_tensor(np.asarray(batch["pixels"], np.float32), device=self.device)
                feats = self._backbone().image_features(px).float()
                parts.append(("images", np.asarray(batch["img_doc"]), self.model.heads.encode_image(feats)))
            if "image_features" in batch:
                sel = np.flatnonzero(np.asarray(batch["img_doc"]) >= 0)
                if len(sel):
                    feats = torch.as_tensor(np.stack(batch["image_features"][sel]).astype(np.float32), device=self.device)
                    parts.append(("images", np.asarray(batch["img_doc"])[sel], self.model.heads.encode_image(feats)))
            if "text_features" in batch:
                sel = np.flatnonzero(np.asarray(batch["cap_doc"]) >= 0)
                if len(sel):
                    feats = torch.as_tensor(np.stack(batch["text_features"][sel]).astype(np.float32), device=self.device)
                    parts.append(("captions", np.asarray(batch["cap_doc"])[sel], self.model.heads.encode_text(feats)))
            elif "caption" in batch and len(batch["caption"]):
                tok = self.model.preprocessor.texts([str(c) for c in batch["caption"]])
                ids = torch.as_tensor(np.asarray(tok["input_ids"]), dtype=torch.long, device=self.device)
                mask = torch.as_tensor(np.asarray(tok["attention_mask"]), dtype=torch.long, device=self.device)
                feats = self._backbone().text_features(ids, mask).float()
                parts.append(("captions", np.asarray(batch["cap_doc"]), self.model.heads.encode_text(feats)))
        sides, docs, dense, sp_idx, sp_val = [], [], [], [], []
        for side, doc, enc in parts:
            d = enc.dense.float().cpu().numpy()
            s = enc.sparse.float().cpu().numpy()
            for r in range(len(doc)):
                nz = np.flatnonzero(s[r])
                sp_idx.append(nz.astype(np.int32))
                sp_val.append(s[r, nz].astype(np.float32))
            sides += [side] * len(doc)
            docs.append(np.asarray(doc, np.int64))
            dense.append(d)
        dim = int(self.model.heads.text_proj.linear.out_features)
        dense_np = np.concatenate(dense).astype(np.float32) if dense else np.zeros((0, dim), np.float32)
        return pa.table({
            "side": pa.array(sides, pa.string()),
            "doc_no": pa.array(np.concatenate(docs) if docs else np.zeros(0, np.int64), pa.int64()),
            "dense": pa.FixedSizeListArray.from_arrays(pa.array(dense_np.reshape(-1)), dense_np.shape[1]),
            "sp_idx": pa.array([x.tolist() for x in sp_idx], pa.list_(pa.int32())),
            "sp_val": pa.array([x.tolist() for x in sp_val], pa.list_(pa.float32())),
        })


def _with_shard(table, *, shard_by_doc: dict):
    """Add the shard number of every encoded document (``shard_by_doc[side][doc_no]``)."""
    import pyarrow as pa

    sides = table.column("side").to_pylist()
    docs = table.column("doc_no").to_pylist()
    shard = [int(shard_by_doc[s][d]) for s, d in zip(sides, docs)]
    return table.append_column("shard", pa.array(shard, pa.int64()))


def _shard_data(rows, meta: dict, vocab_size: int, dense_dim: int):
    """One side's ShardData from encoded rows (pyarrow table, may be empty) and document metadata."""
    from sdray.index import CSR, ShardData

    n = 0 if rows is None else rows.num_rows
    if n == 0:
        return ShardData(dense=np.zeros((0, dense_dim), np.float32),
                         sparse=CSR(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), vocab_size),
                         ids=[], vocab_size=vocab_size)
    doc = rows.column("doc_no").to_numpy()
    order = np.argsort(doc, kind="stable")
    doc = doc[order]
    dense_col = rows.column("dense").combine_chunks()
    dense = np.asarray(dense_col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(n, -1)[order]
    idx = rows.column("sp_idx").to_pylist()
    val = rows.column("sp_val").to_pylist()
    lens = np.asarray([len(idx[i]) for i in order], np.int64)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    indices = np.concatenate([np.asarray(idx[i], np.int32) for i in order]) if lens.sum() else np.zeros(0, np.int32)
    values = np.concatenate([np.asarray(val[i], np.float32) for i in order]) if lens.sum() else np.zeros(0, np.float32)
    m = [meta[int(d)] for d in doc]
    return ShardData(dense=dense, sparse=CSR(indptr, indices, values, vocab_size),
                     ids=[x[0] for x in m], image_ids=[x[1] for x in m], captions=[x[2] for x in m],
                     uris=[x[3] for x in m], doc_no=doc, vocab_size=vocab_size)


def build_one_shard(shard: int, tables: dict, *, out: str, version: str, config: dict, meta: dict,
                    sides: tuple[str, ...], vocab_size: int, dense_dim: int) -> dict:
    """Build and save shard ``shard`` (every side) from its encoded rows; returns ``{side: info}``."""
    from sdray.index import IndexConfig, build_shard

    cfg = IndexConfig.model_validate(config)
    data = {side: _shard_data(tables.get(side), meta[side], vocab_size, dense_dim) for side in sides}
    return build_shard(out, version, shard, data, cfg)


def _build_group(table, *, out, version, config, meta_ref, sides, vocab_size, dense_dim, threads):
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    if threads:
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:  # pragma: no cover
            pass
    meta = ray.get(meta_ref) if isinstance(meta_ref, ray.ObjectRef) else meta_ref
    shard = int(table.column("shard")[0].as_py())
    tables = {side: table.filter(pc.equal(table.column("side"), side)) for side in sides}
    t0 = time.time()
    infos = build_one_shard(shard, tables, out=out, version=version, config=config,
                            meta={s: meta[s][shard] for s in sides}, sides=sides,
                            vocab_size=vocab_size, dense_dim=dense_dim)
    return pa.table({"shard": pa.array([shard], pa.int64()), "info": pa.array([json.dumps(infos)]),
                     "seconds": pa.array([time.time() - t0])})


# ----------------------------------------------------------------------------- the job

class Interrupted(RuntimeError):
    """Raised by the ``interrupt_after`` test hook (simulates a driver killed mid-build)."""


def run_index(model_uri: str, corpus: str, out: str, shards: int = 1, config: Any = None, *,
              num_actors: int = 1, batch_size: int = 64, use_gpu: bool | None = None,
              num_gpus_per_actor: float = 1.0, threads: int | None = None,
              sides: tuple[str, ...] = SIDES, progress: bool = True,
              interrupt_after: int | None = None) -> dict:
    """Run the index job; returns a summary (version, counts, shards built/reused, skips, timings).

    ``config``: an :class:`~sdray.index.IndexConfig` (or dict). ``interrupt_after``: test hook,
    raise :class:`Interrupted` after that many shards were built (before publishing).
    """
    import ray

    from pipelines.datasets import (SkipCounter, ensure_ray, read_features, read_image_text,
                                    split_sample_id)
    from sdray.evaluation import fusion_params
    from sdray.index import IndexConfig, manifest as mf, shard_of
    from sdray.model import RetrievalModel

    t_start = time.time()
    timings: dict[str, float] = {}
    log = logging.getLogger("pipelines.index").info if progress else (lambda msg: None)
    if shards < 1:
        raise ValueError("--shards must be >= 1")
    sides = tuple(s for s in SIDES if s in sides)
    if not sides:
        raise ValueError(f"sides must name some of {SIDES}")
    cfg = config if isinstance(config, IndexConfig) else IndexConfig.model_validate(config or {})
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
    log(f"corpus {corpus}: {'feature' if features else 'raw image-text'} shards; model {model_uri}")

    ensure_ray()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(num_actors, 1))
    data_cfg = model.config.data.model_copy(update={"shuffle_files": False})

    # 1. keys of every valid sample -------------------------------------------------------
    t0 = time.time()
    counter = None
    if features:
        keys_ds = read_features(corpus).select_columns(["sample_id", "image_id", "caption"])
        sources = feature_sources(corpus)
    else:
        counter = SkipCounter.create()
        keys_ds = read_image_text(corpus, data_cfg, None, counter=counter).map_batches(
            _keys_only, batch_format="numpy")
        sources = {}
    rows: list[tuple[str, str, str]] = []
    for b in keys_ds.iter_batches(batch_size=4096, batch_format="numpy"):
        rows += [(str(s), str(i), str(c)) for s, i, c in zip(b["sample_id"], b["image_id"], b["caption"])]
    skips = counter.counts() if counter is not None else {}
    if counter is not None:
        counter.close()
    if not rows:
        raise ValueError(f"no valid samples in {corpus}")
    rows.sort()
    timings["keys_s"] = round(time.time() - t0, 3)

    # dedupe: images by image_id, captions by exact text (first occurrence in sample_id order)
    images: dict[str, int] = {}
    caps: dict[str, int] = {}
    img_meta: list[tuple] = []   # (id, image_id, caption, uri)
    cap_meta: list[tuple] = []
    img_rep: list[str] = []      # representative sample_id
    cap_rep: list[str] = []
    for sid, iid, cap in rows:
        name, key = split_sample_id(sid, sources)
        if features:
            raw = sources.get(name)
            uri = f"{raw}#{key}" if raw and key else None
        else:
            uri = None  # filled below from the shard column (raw pass gives shard URIs)
        if iid not in images:
            images[iid] = len(img_meta)
            img_meta.append((iid, iid, cap, uri))
            img_rep.append(sid)
        if cap not in caps:
            caps[cap] = len(cap_meta)
            cap_meta.append((caption_id(cap), iid, cap, uri))
            cap_rep.append(sid)
    if not features:
        shard_uri = _raw_shard_uris(corpus)
        def raw_uri(sid: str) -> str | None:
            name, key = split_sample_id(sid, shard_uri)
            base = shard_uri.get(name)
            return f"{base}#{key}" if base and key else None
        img_meta = [(a, b, c, raw_uri(s)) for (a, b, c, _), s in zip(img_meta, img_rep)]
        # a caption's uri is the image it first came with (thumbnails for image->caption hits)
        cap_meta = [(a, b, c, raw_uri(s)) for (a, b, c, _), s in zip(cap_meta, cap_rep)]
    counts = {"images": len(img_meta), "captions": len(cap_meta), "samples": len(rows)}
    log(f"{len(rows)} valid samples: {counts['images']} unique images, {counts['captions']} unique captions"
        + (f"; skipped {sum(skips.values())} ({skips})" if skips else ""))

    shard_no = {"images": shard_of([m[0] for m in img_meta], shards),
                "captions": shard_of([m[0] for m in cap_meta], shards)}
    meta_by_side = {"images": img_meta, "captions": cap_meta}

    # 2. version (resume an interrupted build with the same inputs) ------------------------
    digest = hashlib.sha256()
    for side in sides:
        for m in meta_by_side[side]:
            digest.update((side + "\0" + m[0] + "\0").encode("utf-8"))
    fp = mf.fingerprint({"model": model_uri, "corpus": corpus, "config": cfg.model_dump(), "shards": shards,
                         "sides": list(sides), "docs": digest.hexdigest()})
    version, resumed = mf.begin_build(out, fp)
    done = {s: mf.shard_done(out, version, s, sides) for s in range(shards)}
    pending = [s for s in range(shards) if done[s] is None]
    log(f"version {version}" + (" (resuming)" if resumed else "") +
        f": {shards - len(pending)}/{shards} shards already built, {len(pending)} to build")

    infos: dict[int, dict] = {s: i for s, i in done.items() if i is not None}
    built: list[int] = []
    encoded_n = {"images": 0, "captions": 0}
    if pending:
        pend = np.zeros(shards, bool)
        pend[pending] = True
        need = {side: (np.flatnonzero(pend[shard_no[side]]) if side in sides else np.zeros(0, np.int64))
                for side in SIDES}
        encoded_n = {side: int(len(need[side])) for side in SIDES}
        meta_ref = ray.put({side: {s: {int(d): meta_by_side[side][d] for d in need[side] if shard_no[side][d] == s}
                                   for s in pending} for side in sides})
        shard_by_doc = {side: {int(d): int(shard_no[side][d]) for d in need[side]} for side in SIDES}

        # 3. encode (actor pool) ----------------------------------------------------------
        t0 = time.time()
        enc_kwargs = dict(fn_constructor_kwargs={"model_uri": model_uri, "use_gpu": use_gpu,
                                                 "threads": None if use_gpu else threads},
                          batch_size=batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=num_actors),
                          num_gpus=num_gpus_per_actor if use_gpu else 0, num_cpus=1)
        if features:
            plan = {}
            for d in need["images"]:
                plan.setdefault(img_rep[d], [-1, -1])[0] = int(d)
            for d in need["captions"]:
                plan.setdefault(cap_rep[d], [-1, -1])[1] = int(d)
            ds = read_features(corpus).select_columns(["sample_id", "image_features", "text_features"])
            ds = ds.map_batches(functools.partial(_plan_rows, plan=plan,
                                                  columns=("image_features", "text_features")),
                                batch_format="numpy")
            encoded = ds.map_batches(Encoder, **enc_kwargs)
        else:
            parts = []
            if len(need["images"]):
                plan = {img_rep[d]: int(d) for d in need["images"]}
                raw = read_image_text(corpus, data_cfg, decode=False)
                raw = raw.map_batches(functools.partial(_decode_images, plan=plan, preprocessor=model.preprocessor,
                                                        max_pixels=data_cfg.max_image_pixels),
                                      batch_size=data_cfg.read_batch_size, batch_format="numpy")
                parts.append(raw.map_batches(Encoder, **enc_kwargs))
            if len(need["captions"]):
                items = [{"cap_doc": int(d), "caption": cap_meta[d][2]} for d in need["captions"]]
                cap_ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // max(batch_size, 1), 64)))
                parts.append(cap_ds.map_batches(Encoder, **enc_kwargs))
            encoded = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
        encoded = encoded.map_batches(functools.partial(_with_shard, shard_by_doc=shard_by_doc),
                                      batch_format="pyarrow", batch_size=None)

        # 4. build every shard in parallel --------------------------------------------------
        results = encoded.groupby("shard", num_partitions=len(pending)).map_groups(
            functools.partial(_build_group, out=out, version=version, config=cfg.model_dump(), meta_ref=meta_ref,
                              sides=sides, vocab_size=len(vocab), dense_dim=dense_dim,
                              threads=None if use_gpu else threads),
            batch_format="pyarrow")
        bar = Progress("index", len(pending), "shards", enabled=None if progress else False)
        for row in results.iter_rows():
            s = int(row["shard"])
            infos[s] = json.loads(row["info"])
            built.append(s)
            bar.update(1, postfix=f"shard {s} built in {row['seconds']:.1f}s")
            if interrupt_after is not None and len(built) >= interrupt_after:
                raise Interrupted(f"interrupted after {len(built)} shards (test hook)")
        bar.close()
        timings["encode_build_s"] = round(time.time() - t0, 3)
        for s in pending:  # shards that received no document at all
            if s not in infos:
                infos[s] = build_one_shard(s, {}, out=out, version=version, config=cfg.model_dump(),
                                           meta={side: {} for side in sides}, sides=sides,
                                           vocab_size=len(vocab), dense_dim=dense_dim)
                built.append(s)
                log(f"shard {s} is empty ({len(infos)}/{shards} shards)")

    # 5. publish -------------------------------------------------------------------------------
    storage.write_bytes(storage.join(out, version, mf.VOCAB), json.dumps(vocab).encode("utf-8"))
    manifest = mf.make_manifest(
        version, [infos[s] for s in range(shards)], model=model_uri, config=cfg.model_dump(), fusion=fusion,
        has_vocab=True, extra={"corpus": corpus, "corpus_kind": "features" if features else "raw",
                               "samples": len(rows), "skips": skips})
    mf.publish(out, version, manifest)
    timings["total_s"] = round(time.time() - t_start, 3)
    summary = {"version": version, "out": out, "shards": shards, "resumed": resumed,
               "built": sorted(built), "reused": sorted(set(range(shards)) - set(built)),
               "counts": {side: manifest["sides"].get(side, {}).get("count", 0) for side in sides},
               "encoded": {side: encoded_n[side] for side in sides},
               "samples": len(rows), "skips": skips, "fusion": fusion, "timings": timings}
    log(f"published {version}: {summary['counts']} in {shards} shards ({timings['total_s']:.1f}s)")
    return summary


def _raw_shard_uris(corpus: str) -> dict[str, str]:
    from pipelines.datasets import list_shards, shard_ids

    return {sid: u for u, sid in shard_ids(list_shards(corpus), corpus).items()}


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model URI (folder or s3:// prefix)")
    parser.add_argument("--corpus", required=True, help="raw image-text shards or feature shards")
    parser.add_argument("--out", required=True, help="index root (folder or s3:// prefix)")
    parser.add_argument("--shards", type=int, default=1, help="number of index shards")
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
                        num_actors=args.num_actors, batch_size=args.batch_size, use_gpu=args.use_gpu,
                        num_gpus_per_actor=args.num_gpus_per_actor,
                        threads=args.threads, sides=tuple(s.strip() for s in args.sides.split(",")))
    print(f"index {summary['out']} version {summary['version']}: {summary['counts']['images'] if 'images' in summary['counts'] else 0} "
          f"images, {summary['counts'].get('captions', 0)} captions in {summary['shards']} shards "
          f"(built {len(summary['built'])}, reused {len(summary['reused'])}) in {summary['timings']['total_s']:.1f}s")
    if args.json:
        print(json.dumps(summary))
    return 0
