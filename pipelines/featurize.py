"""``sdray featurize``: frozen-backbone features of image–text shards (Ray Data batch inference).

Pipeline: the list of pending input shards -> an actor pool of Featurizers (:class:`Featurizer`)
(``ActorPoolStrategy``; GPU + fp16 when present). Each actor takes one whole input shard at a
time: reads it (retried; a storage fault fails the task, Ray retries it, then the job fails
naming the shard), decodes the next batch in a background thread while the backbone runs on the
current one, writes the shard's feature Parquet itself, then its record ``OUT/_shards/<id>.json``,
and sends the driver only that small record. The driver never holds feature rows, and each
finished shard costs one small write (O(1)); ``OUT/manifest.json`` is written once at the end
from the records. A re-run skips every shard with a record (and its Parquet), so an interrupted
job resumes; a shard is redone if its output is gone.

Feature shard columns: ``sample_id``, ``image_id``, ``caption``, ``key``, ``url`` (img2dataset's
source URL, else null), ``input_ids`` (list<int32>, unpadded), ``text_features``
(fixed_size_list<float32>[text_dim]), ``image_features`` (fixed_size_list<float32>[image_dim]).
Output files mirror the input layout: ``DATA/train/shard-00000.tar`` ->
``OUT/train/shard-00000.parquet``; sample ids carry the same relative path
(``train/shard-00000/<key>``).
"""

from __future__ import annotations

import argparse
import logging
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from sdray import storage
from sdray.backbones.compat import feature_signature
from sdray.config import BackboneConfig, DataConfig, StorageConfig
from sdray.progress import Progress

MANIFEST = "manifest.json"
RECORDS = "_shards"            # OUT/_shards/<shard id>.json: one record per finished input shard
FEATURE_COLUMNS = ("sample_id", "image_id", "caption", "key", "url", "image_loc", "input_ids",
                   "text_features", "image_features")


class Featurizer:
    """Actor: the frozen backbone. ``__call__`` featurizes whole input shards (one row of
    ``shard``, ``shard_id``, ``output``, ``record`` URIs each) and returns their records;
    :meth:`features` maps one decoded batch to feature rows.

    Images are decoded to uint8 pixels (a quarter of float32's bytes over PCIe) and normalised on
    the actor's device; the backbone runs under fp16 autocast on CUDA (``fp16``). ``use_gpu``:
    True / False, or ``None`` for "when one is visible"."""

    def __init__(self, backbone_cfg: dict, fp16: bool = True, threads: int | None = None,
                 cache_size: int = 4096, *, data_cfg: dict | None = None,
                 storage_cfg: dict | None = None, batch_size: int = 64, use_gpu: bool | None = None):
        import torch

        from sdray.backbones import load_backbone, load_preprocessor
        from sdray.devices import resolve_device

        if threads:
            torch.set_num_threads(int(threads))
        self.device = resolve_device(use_gpu)
        self.fp16 = bool(fp16 and self.device.type == "cuda")
        self.backbone_cfg = BackboneConfig(**backbone_cfg)
        self.backbone = load_backbone(self.backbone_cfg).to(self.device).eval()
        self.preprocessor = load_preprocessor(self.backbone_cfg).for_device_normalization()
        self.data_cfg = DataConfig.model_validate(data_cfg or {})
        self.storage_cfg = storage.configure_retries(storage_cfg, export_env=False)
        self.batch_size = int(batch_size)
        self.cache: dict[str, np.ndarray] = {}     # image_id -> features (images with many captions)
        self.cache_size = cache_size

    def _image_features(self, image_ids, pixels) -> np.ndarray:
        import torch

        out = np.empty((len(image_ids), self.backbone.image_dim), np.float32)
        todo: dict[str, int] = {}
        for i, iid in enumerate(image_ids):
            iid = str(iid)
            if iid in self.cache:
                out[i] = self.cache[iid]
            elif iid not in todo:
                todo[iid] = i
        if todo:
            idx = list(todo.values())
            x = torch.from_numpy(np.ascontiguousarray(pixels[idx])).to(self.device, non_blocking=True)
            with torch.inference_mode():
                feats = self.backbone.pixel_features(x, self.fp16).cpu().numpy()
            if len(self.cache) + len(todo) > self.cache_size:
                self.cache.clear()
            for (iid, _), f in zip(todo.items(), feats):
                self.cache[iid] = f
        for i, iid in enumerate(image_ids):
            out[i] = self.cache[str(iid)]
        return out

    def _text_features(self, ids, mask) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = self.backbone.token_features(torch.from_numpy(ids).to(self.device),
                                             torch.from_numpy(mask).to(self.device), self.fp16)
        return t.cpu().numpy()

    def features(self, batch: dict) -> "Any":
        """Decoded batch (``pixels`` (B,3,S,S), ``input_ids``/``attention_mask`` (B,L), ids,
        captions, ``key``, ``url``, ``image_loc``) -> a pyarrow table of :data:`FEATURE_COLUMNS`."""
        import pyarrow as pa

        n = len(batch["sample_id"])
        ids = np.asarray(batch["input_ids"], np.int64)
        mask = np.asarray(batch["attention_mask"], np.int64)
        img = self._image_features(batch["image_id"], batch["pixels"]) if n else np.zeros(
            (0, self.backbone.image_dim), np.float32)
        txt = self._text_features(ids, mask) if n else np.zeros((0, self.backbone.text_dim), np.float32)
        lens = mask.sum(1) if n else np.zeros(0, np.int64)
        flat = ids[mask.astype(bool)].astype(np.int32) if n else np.zeros(0, np.int32)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        return pa.table({
            "sample_id": pa.array([str(x) for x in batch["sample_id"]], pa.string()),
            "image_id": pa.array([str(x) for x in batch["image_id"]], pa.string()),
            "caption": pa.array([str(x) for x in batch["caption"]], pa.string()),
            "key": pa.array([str(x) for x in batch["key"]], pa.string()),
            "url": pa.array([None if x is None else str(x) for x in batch["url"]], pa.string()),
            "image_loc": pa.array([None if x is None else str(x) for x in batch["image_loc"]], pa.string()),
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32())),
            "text_features": pa.FixedSizeListArray.from_arrays(
                pa.array(txt.ravel(), pa.float32()), txt.shape[1]),
            "image_features": pa.FixedSizeListArray.from_arrays(
                pa.array(img.ravel(), pa.float32()), img.shape[1]),
        })

    def _decode(self, rows: list[dict], counts) -> dict:
        from sdray.data.decode import decode_batch

        cols = {k: np.asarray([r[k] for r in rows] + [None], dtype=object)[:-1]
                for k in ("sample_id", "image_id", "caption", "image", "key", "url", "image_loc")}
        return decode_batch(cols, self.preprocessor, counts, self.data_cfg.max_image_pixels)

    def featurize_shard(self, shard: str, shard_id: str, output: str, record: str) -> dict:
        """Read, decode, featurize and write one input shard; then write and return its record.

        Raises :class:`~sdray.storage.ShardStorageError` when the shard cannot be read (the record
        is then not written, so the shard is never done with fewer samples than it holds).
        """
        import pyarrow as pa

        from pipelines.datasets import read_shard_rows, upstream_failures
        from sdray.data.skips import SkipCounts

        t0 = time.time()
        counts = SkipCounts()
        rows = read_shard_rows(shard, counts, self.data_cfg.max_caption_bytes, shard=shard_id,
                               storage_cfg=self.storage_cfg)
        chunks = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        tables = []
        with ThreadPoolExecutor(1) as pool:      # decode batch i+1 while the backbone runs batch i
            nxt = pool.submit(self._decode, chunks[0], counts) if chunks else None
            for i in range(len(chunks)):
                batch = nxt.result()
                nxt = pool.submit(self._decode, chunks[i + 1], counts) if i + 1 < len(chunks) else None
                if len(batch["sample_id"]):
                    tables.append(self.features(batch))
        n = sum(t.num_rows for t in tables)
        if n:
            data = _parquet_bytes(pa.concat_tables(tables))
            storage.write_bytes_atomic(output, data)      # retried; a fault names the object
        upstream = upstream_failures(shard)               # read_bytes retries; a fault names the file
        rec = {"shard": shard, "shard_id": shard_id, "output": output, "n_samples": n,
               "read": len(rows), "skips": _nonzero(counts), "upstream": upstream,
               "backbone": self.backbone_cfg.model_dump(mode="json"),
               "text_dim": self.backbone.text_dim, "image_dim": self.backbone.image_dim,
               "seconds": round(time.time() - t0, 3)}
        body = json.dumps(rec, sort_keys=True).encode("utf-8")
        storage.write_bytes_atomic(record, body)
        return rec

    def __call__(self, batch: dict) -> dict:
        recs = [self.featurize_shard(str(s), str(i), str(o), str(r)) for s, i, o, r in
                zip(batch["shard"], batch["shard_id"], batch["output"], batch["record"])]
        return {"record": np.asarray([json.dumps(r) for r in recs], dtype=object)}


def actor_pool_bounds(num_actors: int, min_actors: int | None,
                      max_actors: int | None) -> tuple[int, int]:
    """``(min_size, max_size)`` of the backbone actor pool: fixed at ``num_actors`` unless
    ``min_actors``/``max_actors`` ask for an autoscaling pool (Ray Data adds actors up to
    ``max_size`` while work queues up, e.g. as a cluster autoscaler brings GPU nodes)."""
    lo = num_actors if min_actors is None else min_actors
    hi = max(lo, num_actors) if max_actors is None else max_actors
    if lo < 1 or hi < lo:
        raise ValueError(f"actor pool needs 1 <= --min-actors ({lo}) <= --max-actors ({hi})")
    return lo, hi


def backbone_dims(backbone_cfg: BackboneConfig) -> tuple[int, int, int]:
    """(text_dim, image_dim, vocab_size) without keeping the model around."""
    from sdray.backbones import load_backbone

    b = load_backbone(backbone_cfg)
    return b.text_dim, b.image_dim, b.vocab_size


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _nonzero(d: dict) -> dict:
    return {k: int(v) for k, v in sorted(d.items()) if v}


def _done_records(out: str, shards: set[str], backbone: dict) -> dict[str, dict]:
    """Records of the shards already done under ``out`` (a previous run, finished or not).

    One listing of the records and one of the outputs; a record is read only when the last
    summary manifest does not hold it already. A record whose Parquet is gone is not done.
    """
    summary: dict = {}
    try:
        summary = storage.read_json(storage.join(out, MANIFEST))
    except FileNotFoundError:
        pass
    old = summary.get("backbone")
    if old and old != backbone:
        raise ValueError(f"{out} holds features of another backbone ({old}); "
                         f"use a new --out or remove it")
    dims = {k: summary[k] for k in ("text_dim", "image_dim") if k in summary}
    known = {info.get("record"): {**dims, **info, "shard": shard}
             for shard, info in summary.get("shards", {}).items()}
    outputs = set(storage.list_files(out, (".parquet",)))
    done: dict[str, dict] = {}
    for uri in storage.list_files(storage.join(out, RECORDS), (".json",)):
        rec = known.get(uri) or storage.read_json(uri)
        if rec.get("backbone", backbone) != backbone:
            raise ValueError(f"{out} holds features of another backbone ({rec['backbone']}); "
                             f"use a new --out or remove it")
        if rec["shard"] in shards and (rec["n_samples"] == 0 or rec["output"] in outputs):
            done[rec["shard"]] = {**rec, "record": uri}
    return done


def featurize(data: str, out: str, backbone_cfg: BackboneConfig | None = None,
              data_cfg: DataConfig | None = None, *, batch_size: int = 64,
              num_actors: int = 1, actor_cpus: float | None = None, threads: int | None = None,
              use_gpu: bool | None = None, fp16: bool = True, progress: bool = True,
              max_shards: int | None = None, storage_cfg: StorageConfig | None = None,
              num_gpus_per_actor: float = 1.0, min_actors: int | None = None,
              max_actors: int | None = None) -> dict:
    """Run the featurize job; returns the manifest (also written to ``OUT/manifest.json``).

    ``use_gpu``: backbone actors on GPUs (``None``: when the cluster has one), each reserving
    ``num_gpus_per_actor`` (a fraction packs several actors on one GPU). The actor pool scales
    between ``min_actors`` and ``max_actors`` (default: a fixed pool of ``num_actors``).

    Raises :class:`~sdray.storage.ShardStorageError` (through Ray) when a shard cannot be read after
    every retry, and ``ValueError`` when the input is not empty but no sample was kept.
    """
    with storage.retries(storage_cfg):
        return _featurize(data, out, backbone_cfg or BackboneConfig(), data_cfg or DataConfig(),
                          batch_size=batch_size, num_actors=num_actors, actor_cpus=actor_cpus,
                          threads=threads, use_gpu=use_gpu, fp16=fp16, progress=progress,
                          max_shards=max_shards, storage_cfg=storage.retry_config(),
                          num_gpus_per_actor=num_gpus_per_actor,
                          pool=actor_pool_bounds(num_actors, min_actors, max_actors))


def _featurize(data: str, out: str, backbone_cfg: BackboneConfig, data_cfg: DataConfig, *,
               batch_size: int, num_actors: int, actor_cpus: float | None, threads: int | None,
               use_gpu: bool | None, fp16: bool, progress: bool, max_shards: int | None,
               storage_cfg: StorageConfig, num_gpus_per_actor: float,
               pool: tuple[int, int]) -> dict:
    import ray

    from pipelines.datasets import ensure_ray, list_shards, retry_shard_tasks, shard_ids

    log = logging.getLogger("pipelines.featurize").info if progress else (lambda msg: None)
    storage.check_access(data)
    storage.check_access(out, write=True)
    all_shards = list_shards(data)
    if not all_shards:
        raise FileNotFoundError(f"no .tar or .parquet shards under {data}")
    ids = shard_ids(all_shards, str(data))
    backbone = backbone_cfg.model_dump(mode="json")
    done = _done_records(out, set(all_shards), backbone)
    pending = [s for s in all_shards if s not in done]
    if max_shards is not None:
        pending = pending[:max_shards]
    log(f"{len(all_shards)} shards under {data}; {len(done)} already done, {len(pending)} to do")

    t0 = time.time()
    n_new = 0
    bar = Progress("featurize", len(pending), "shards", enabled=None if progress else False)
    if pending:
        ensure_ray()
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        # Logical CPUs reserved per actor and torch threads per actor (the cores it may use).
        actor_cpus = 1.0 if actor_cpus is None else actor_cpus
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // pool[1])
        items = [{"shard": s, "shard_id": ids[s], "output": storage.join(out, ids[s] + ".parquet"),
                  "record": storage.join(out, RECORDS, ids[s] + ".json")} for s in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        retry_shard_tasks(ds, storage_cfg)
        ds = ds.map_batches(
            Featurizer,
            fn_constructor_kwargs={"backbone_cfg": backbone, "fp16": fp16,
                                   "threads": None if use_gpu else threads,
                                   "data_cfg": data_cfg.model_dump(mode="json"),
                                   "storage_cfg": storage_cfg.model_dump(),
                                   "batch_size": batch_size, "use_gpu": bool(use_gpu)},
            batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]),
            num_gpus=num_gpus_per_actor if use_gpu else 0, num_cpus=actor_cpus,
            # this job's S3 settings reach its actors even on a cluster started with others
            runtime_env={"env_vars": storage.s3_env()} if storage.s3_env() else None)
        for row in ds.iter_rows():
            rec = json.loads(row["record"])
            done[rec["shard"]] = {**rec, "record": storage.join(out, RECORDS, rec["shard_id"] + ".json")}
            n_new += rec["n_samples"]
            rate = n_new / max(time.time() - t0, 1e-9)
            bar.update(1, postfix=f"{n_new} new samples, {rate:.1f} samples/s ({rec['shard_id']}: "
                                  f"{rec['n_samples']} kept of {rec['read']} read, "
                                  f"{sum(rec['skips'].values())} skipped)")
    bar.close()
    m = _manifest_dict(data, out, backbone_cfg, done, all_shards)
    m["last_run"] = {"shards": len(pending), "samples": n_new,
                     "seconds": round(time.time() - t0, 3),
                     "samples_per_s": round(n_new / max(time.time() - t0, 1e-9), 2)}
    if m["n_samples"] == 0 and len(done) == len(all_shards):
        raise ValueError(f"no sample kept from the {len(all_shards)} shards under {data} "
                         f"(skipped: {_summary(m['skips'])}); nothing written to {out}")
    storage.write_json(storage.join(out, MANIFEST), m)
    log(f"done: {m['n_samples']} samples in {len(m['shards_done'])} shards; skipped: "
        f"{_summary(m['skips'])}" + (f"; failed upstream downloads: {_summary(m['upstream'])}"
                                     if m["upstream"] else ""))
    return m


def _summary(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items()) or "none"


def _manifest_dict(data: str, out: str, backbone_cfg: BackboneConfig, done: dict[str, dict],
                   all_shards: list[str]) -> dict:
    totals: dict[str, int] = {}
    upstream: dict[str, int] = {}
    for rec in done.values():
        for k, v in rec.get("skips", {}).items():
            totals[k] = totals.get(k, 0) + int(v)
        for k, v in rec.get("upstream", {}).items():
            upstream[k] = upstream.get(k, 0) + int(v)
    dims = next((rec for rec in done.values() if "text_dim" in rec), None)
    if dims is None:
        text_dim, image_dim, _ = backbone_dims(backbone_cfg)
        dims = {"text_dim": text_dim, "image_dim": image_dim}
    shards = {s: {k: rec[k] for k in ("output", "n_samples", "skips", "shard_id", "read",
                                      "upstream", "record") if k in rec}
              for s, rec in sorted(done.items())}
    return {
        "kind": "sdray.features",
        "data": str(data),
        "backbone": backbone_cfg.model_dump(mode="json"),
        "backbone_name": backbone_cfg.name,
        "preprocessing": {**feature_signature(backbone_cfg),
                          "pixels": "uint8 to the backbone's device, normalised there"},
        "text_dim": dims["text_dim"],
        "image_dim": dims["image_dim"],
        "n_samples": int(sum(rec["n_samples"] for rec in done.values())),
        "skips": dict(sorted(totals.items())),
        "upstream": dict(sorted(upstream.items())),
        "shards_done": sorted(done),
        "shards_total": len(all_shards),
        "shards": shards,
        "files": sorted(rec["output"] for rec in done.values() if rec["n_samples"]),
        "columns": list(FEATURE_COLUMNS),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="image-text shards: folder or s3:// prefix")
    parser.add_argument("--out", required=True, help="where feature shards go (folder or s3://)")
    parser.add_argument("--backbone", default="packaged", choices=["packaged", "clip", "blip", "siglip"],
                        help="frozen backbone: the packaged MiniLM + EfficientNet-Lite0, or a HF model")
    parser.add_argument("--backbone-path", default=None, help="hub id or folder for HF backbones")
    parser.add_argument("--image-size", type=int, default=None,
                        help="backbone input side (default: the backbone config's)")
    parser.add_argument("--max-text-length", type=int, default=None,
                        help="caption tokens after truncation (default: the backbone config's)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per backbone forward pass")
    parser.add_argument("--num-actors", type=int, default=1,
                        help="fixed actor-pool size (one per GPU, or a CPU share)")
    parser.add_argument("--min-actors", type=int, default=None,
                        help="autoscaling actor pool: at least this many backbone actors")
    parser.add_argument("--max-actors", type=int, default=None,
                        help="autoscaling actor pool: at most this many (e.g. the cluster's GPUs)")
    parser.add_argument("--use-gpu", action="store_true", default=None,
                        help="run the backbone actors on GPUs (default: when the cluster has one)")
    parser.add_argument("--num-gpus-per-actor", type=float, default=1.0,
                        help="GPUs reserved per backbone actor (a fraction packs several on one GPU)")
    parser.add_argument("--actor-cpus", type=float, default=None,
                        help="logical Ray CPUs reserved per actor (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per actor (default: machine cores / actors)")
    parser.add_argument("--no-fp16", action="store_true", help="fp32 on GPU")
    parser.add_argument("--max-image-pixels", type=int, default=None,
                        help="larger images are skipped as oversized (default: the data config's)")
    parser.add_argument("--json", action="store_true", help="print the manifest as one JSON line")


def main(args: argparse.Namespace) -> int:
    fields: dict[str, Any] = {"name": args.backbone}
    if args.backbone_path:
        fields["path"] = args.backbone_path
    if args.image_size:
        fields["image_size"] = args.image_size
    if args.max_text_length:
        fields["max_text_length"] = args.max_text_length
    data_cfg = DataConfig() if args.max_image_pixels is None else DataConfig(
        max_image_pixels=args.max_image_pixels)
    m = featurize(args.data, args.out, BackboneConfig(**fields), data_cfg,
                  batch_size=args.batch_size, num_actors=args.num_actors,
                  actor_cpus=args.actor_cpus, threads=args.threads, fp16=not args.no_fp16,
                  use_gpu=args.use_gpu, num_gpus_per_actor=args.num_gpus_per_actor,
                  min_actors=args.min_actors, max_actors=args.max_actors)
    summary = {k: m[k] for k in ("n_samples", "text_dim", "image_dim", "skips", "shards_total")}
    summary["shards_done"] = len(m["shards_done"])
    summary["last_run"] = m.get("last_run")
    summary["out"] = args.out
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"featurized {m['n_samples']} samples into {args.out} "
              f"(text_dim {m['text_dim']}, image_dim {m['image_dim']}); skipped: "
              + (", ".join(f"{k}={v}" for k, v in m["skips"].items()) or "none"))
    return 0
