"""``sdray featurize``: frozen-backbone features of image–text shards (Ray Data batch inference).

Pipeline: shard list -> read (tasks) -> decode + preprocess + tokenise (tasks, ``map_batches``)
-> frozen backbone in an actor pool (``ActorPoolStrategy``; GPU + fp16 when present) -> the
driver gathers rows per input shard and writes one Parquet feature shard per input shard as soon
as all of that shard's rows have come through. ``OUT/manifest.json`` is rewritten after each
shard, so a re-run skips the shards already done.

Feature shard columns: ``sample_id``, ``image_id``, ``caption``, ``input_ids`` (list<int32>,
unpadded), ``text_features`` (fixed_size_list<float32>[text_dim]), ``image_features``
(fixed_size_list<float32>[image_dim]). Output files mirror the input layout:
``DATA/train/shard-00000.tar`` -> ``OUT/train/shard-00000.parquet``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import posixpath
import sys
import time
from typing import Any

import numpy as np

from sdray import storage
from sdray.config import BackboneConfig, DataConfig

MANIFEST = "manifest.json"
FEATURE_COLUMNS = ("sample_id", "image_id", "caption", "input_ids", "text_features",
                   "image_features")


class Featurizer:
    """Actor state: the frozen backbone. ``__call__`` maps a decoded batch to feature rows."""

    def __init__(self, backbone_cfg: dict, fp16: bool = True, threads: int | None = None,
                 cache_size: int = 4096):
        import torch

        from sdray.backbones import load_backbone

        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.fp16 = bool(fp16 and self.device.type == "cuda")
        self.backbone = load_backbone(BackboneConfig(**backbone_cfg)).to(self.device).eval()
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
            x = torch.from_numpy(np.ascontiguousarray(pixels[idx])).to(self.device)
            with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=self.fp16):
                feats = self.backbone.image_features(x).float().cpu().numpy()
            if len(self.cache) + len(todo) > self.cache_size:
                self.cache.clear()
            for (iid, _), f in zip(todo.items(), feats):
                self.cache[iid] = f
        for i, iid in enumerate(image_ids):
            out[i] = self.cache[str(iid)]
        return out

    def _text_features(self, ids, mask) -> np.ndarray:
        import torch

        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=self.fp16):
            t = self.backbone.text_features(torch.from_numpy(ids).to(self.device),
                                            torch.from_numpy(mask).to(self.device))
        return t.float().cpu().numpy()

    def __call__(self, batch: dict) -> "Any":
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
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32())),
            "text_features": pa.FixedSizeListArray.from_arrays(
                pa.array(txt.ravel(), pa.float32()), txt.shape[1]),
            "image_features": pa.FixedSizeListArray.from_arrays(
                pa.array(img.ravel(), pa.float32()), img.shape[1]),
            "shard": pa.array([str(x) for x in batch["shard"]], pa.string()),
        })


def backbone_dims(backbone_cfg: BackboneConfig) -> tuple[int, int, int]:
    """(text_dim, image_dim, vocab_size) without keeping the model around."""
    from sdray.backbones import load_backbone

    b = load_backbone(backbone_cfg)
    return b.text_dim, b.image_dim, b.vocab_size


def _relative(shard: str, root: str, single: bool) -> str:
    """Output name of a shard: its path under the data root, suffix replaced by .parquet."""
    if single:
        rel = posixpath.basename(shard)
    else:
        rel = shard[len(root.rstrip("/")):].lstrip("/")
    for suf in (".tar", ".parquet"):
        if rel.endswith(suf):
            rel = rel[: -len(suf)]
    return rel + ".parquet"


def _write_table(uri: str, table) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes_atomic(uri, buf.getvalue())


def featurize(data: str, out: str, backbone_cfg: BackboneConfig | None = None,
              data_cfg: DataConfig | None = None, *, batch_size: int = 64,
              num_actors: int = 1, actor_cpus: float | None = None, threads: int | None = None,
              use_gpu: bool | None = None,
              fp16: bool = True, progress: bool = True, max_shards: int | None = None) -> dict:
    """Run the featurize job; returns the manifest (also written to ``OUT/manifest.json``)."""
    import ray

    from pipelines.datasets import SkipCounter, ensure_ray, list_shards, read_image_text
    from sdray.backbones import load_preprocessor

    backbone_cfg = backbone_cfg or BackboneConfig()
    data_cfg = (data_cfg or DataConfig()).model_copy(update={"shuffle_files": False})
    log = (lambda msg: print(f"featurize: {msg}", file=sys.stderr, flush=True)) if progress else (
        lambda msg: None)
    storage.check_access(data)
    storage.check_access(out, write=True)
    all_shards = list_shards(data)
    if not all_shards:
        raise FileNotFoundError(f"no .tar or .parquet shards under {data}")
    single = len(all_shards) == 1 and all_shards[0].rstrip("/") == str(data).rstrip("/")
    outputs = {s: storage.join(out, _relative(s, str(data), single)) for s in all_shards}

    manifest_uri = storage.join(out, MANIFEST)
    manifest: dict[str, Any] = {}
    if storage.exists(manifest_uri):
        manifest = storage.read_json(manifest_uri)
        old = manifest.get("backbone", {})
        if old and old != backbone_cfg.model_dump(mode="json"):
            raise ValueError(f"{out} holds features of another backbone ({old}); "
                             f"use a new --out or remove it")
    shards_info: dict[str, dict] = dict(manifest.get("shards", {}))
    done = {s for s, info in shards_info.items()
            if info.get("n_samples", 0) == 0 or storage.exists(info["output"])}
    pending = [s for s in all_shards if s not in done]
    if max_shards is not None:
        pending = pending[:max_shards]
    log(f"{len(all_shards)} shards under {data}; {len(all_shards) - len(pending)} already done, "
        f"{len(pending)} to do")

    ensure_ray()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    # Logical CPUs reserved per actor (keep it below the cluster's total so the read and decode
    # tasks can run beside it) and torch threads per actor (the physical cores it may use).
    if actor_cpus is None:
        actor_cpus = 1.0
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(num_actors, 1))
    text_dim = manifest.get("text_dim")
    image_dim = manifest.get("image_dim")

    t0 = time.time()
    n_new = 0
    counter = SkipCounter.create()
    if pending:
        pre = load_preprocessor(backbone_cfg)
        ds = read_image_text(pending, data_cfg, pre, counter=counter)
        ds = ds.map_batches(
            Featurizer,
            fn_constructor_kwargs={"backbone_cfg": backbone_cfg.model_dump(mode="json"),
                                   "fp16": fp16, "threads": None if use_gpu else threads},
            batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=1 if use_gpu else 0, num_cpus=actor_cpus)
        buffers: dict[str, list] = {s: [] for s in pending}
        received: dict[str, int] = {s: 0 for s in pending}
        finished: set[str] = set()

        def finish(shard: str, tally: dict) -> None:
            nonlocal n_new, text_dim, image_dim
            import pyarrow as pa

            parts = buffers.pop(shard, [])
            n = sum(t.num_rows for t in parts)
            if n:
                table = pa.concat_tables(parts).drop_columns(["shard"])
                text_dim = table.schema.field("text_features").type.list_size
                image_dim = table.schema.field("image_features").type.list_size
                _write_table(outputs[shard], table)
            n_new += n
            shards_info[shard] = {"output": outputs[shard], "n_samples": n,
                                  "skips": _nonzero(tally.get("skips", {}))}
            finished.add(shard)
            _write_manifest()
            rate = n_new / max(time.time() - t0, 1e-9)
            log(f"{len(finished)}/{len(pending)} shards, {n_new} samples, {rate:.1f} samples/s "
                f"({posixpath.basename(shard)}: {n} kept, "
                f"{sum(tally.get('skips', {}).values())} skipped)")

        def _write_manifest() -> None:
            m = _manifest_dict(data, out, backbone_cfg, text_dim, image_dim, shards_info,
                               all_shards)
            storage.write_json(manifest_uri, m)

        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if table.num_rows == 0:
                continue
            shards_col = table.column("shard").to_pylist()
            for shard in set(shards_col):
                mask = [s == shard for s in shards_col]
                part = table.filter(mask) if len(set(shards_col)) > 1 else table
                buffers[shard].append(part)
                received[shard] += part.num_rows
            tallies = counter.shards()
            for shard in list(buffers):
                st = tallies.get(shard)
                if st and st["read"] >= 0 and received[shard] + st["dropped"] == st["read"]:
                    finish(shard, st)
        tallies = counter.shards()
        for shard in list(buffers):
            st = tallies.get(shard, {"read": received[shard], "dropped": 0, "skips": {}})
            if st["read"] >= 0 and received[shard] + st["dropped"] != st["read"]:
                log(f"warning: {shard}: {received[shard]} rows + {st['dropped']} dropped "
                    f"!= {st['read']} read")
            finish(shard, st)
        counter.close()
    if text_dim is None or image_dim is None:
        text_dim, image_dim, _ = backbone_dims(backbone_cfg)
    m = _manifest_dict(data, out, backbone_cfg, text_dim, image_dim, shards_info, all_shards)
    m["last_run"] = {"shards": len(pending), "samples": n_new,
                     "seconds": round(time.time() - t0, 3),
                     "samples_per_s": round(n_new / max(time.time() - t0, 1e-9), 2)}
    storage.write_json(manifest_uri, m)
    log(f"done: {m['n_samples']} samples in {len(m['shards_done'])} shards; skipped: "
        + (", ".join(f"{k}={v}" for k, v in m["skips"].items()) or "none"))
    return m


def _nonzero(d: dict) -> dict:
    return {k: int(v) for k, v in sorted(d.items()) if v}


def _manifest_dict(data, out, backbone_cfg, text_dim, image_dim, shards_info, all_shards) -> dict:
    totals: dict[str, int] = {}
    for info in shards_info.values():
        for k, v in info.get("skips", {}).items():
            totals[k] = totals.get(k, 0) + int(v)
    files = sorted(info["output"] for info in shards_info.values() if info.get("n_samples"))
    return {
        "kind": "sdray.features",
        "data": str(data),
        "backbone": backbone_cfg.model_dump(mode="json"),
        "backbone_name": backbone_cfg.name,
        "text_dim": text_dim,
        "image_dim": image_dim,
        "n_samples": int(sum(info.get("n_samples", 0) for info in shards_info.values())),
        "skips": dict(sorted(totals.items())),
        "shards_done": sorted(shards_info),
        "shards_total": len(all_shards),
        "shards": shards_info,
        "files": files,
        "columns": list(FEATURE_COLUMNS),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="image-text shards: folder or s3:// prefix")
    parser.add_argument("--out", required=True, help="where feature shards go (folder or s3://)")
    parser.add_argument("--backbone", default="packaged", choices=["packaged", "clip", "blip", "siglip"])
    parser.add_argument("--backbone-path", default=None, help="hub id or folder for HF backbones")
    parser.add_argument("--image-size", type=int, default=None,
                        help="backbone input side (default: the backbone config's)")
    parser.add_argument("--max-text-length", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--actor-cpus", type=float, default=None,
                        help="logical Ray CPUs reserved per actor (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per actor (default: machine cores / actors)")
    parser.add_argument("--no-fp16", action="store_true", help="fp32 on GPU")
    parser.add_argument("--max-image-pixels", type=int, default=None)
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
    try:
        m = featurize(args.data, args.out, BackboneConfig(**fields), data_cfg,
                      batch_size=args.batch_size, num_actors=args.num_actors,
                      actor_cpus=args.actor_cpus, threads=args.threads, fp16=not args.no_fp16)
    except (storage.StorageError, FileNotFoundError, ValueError) as err:
        print(f"sdray featurize: error: {err}", file=sys.stderr)
        return 2
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
