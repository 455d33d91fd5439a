"""Ray Data readers for image–text shards and feature shards (the thin Ray layer over sdray.data).

>>> counter = SkipCounter.create()
>>> ds = read_image_text("s3://bucket/train", DataConfig(), load_preprocessor(cfg), counter=counter)
>>> for batch in ds.iter_batches(batch_size=64, local_shuffle_buffer_size=1024): ...
>>> counter.counts()            # {"image_truncated": 2, "caption_empty": 1, ...}

How skip counts are collected: every read/decode task adds its per-reason counts to one small
Ray actor (:class:`SkipCounter`) before it returns its rows, so after a dataset has been fully
consumed ``counter.counts()`` is exact; mid-stream it is a lower bound. The actor also keeps,
per input shard, how many raw samples were read and how many were dropped while decoding, which
lets a consumer (featurize) tell when all of a shard's rows have come through.

Faults vs bad data: a shard is read in full (``storage.read_shard_bytes``: botocore/s3fs retries,
then bounded whole-shard attempts) before it is parsed. A storage error that survives them raises
:class:`~sdray.storage.ShardStorageError` naming the shard; the read task fails, Ray retries it
(``StorageConfig.task_retries``) and then the job fails. Only bytes read in full that do not parse
are counted as bad data (``shard_unreadable``/``shard_truncated``).

Sample ids are ``<shard path under the input root, no suffix>/<key>`` (unique across the input).

Shuffling: the shard list is shuffled (seeded) when ``DataConfig.shuffle_files``; within a
shard, samples go through a seeded shuffle buffer of ``DataConfig.shuffle_buffer`` samples.
Consumers may add Ray's ``local_shuffle_buffer_size`` when iterating.
"""

from __future__ import annotations

import functools
import logging
import os
import random
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from sdray import storage
from sdray.config import DataConfig, StorageConfig
from sdray.data.decode import decode_batch
from sdray.data.formats import is_sidecar, iter_shard_samples, shard_id, stats_uri
from sdray.data.skips import SkipCounts

SHARD_SUFFIXES = (".tar", ".parquet")
RAW_COLUMNS = ("sample_id", "image_id", "caption", "image", "key", "url", "image_loc", "shard")


# ----------------------------------------------------------------------------- Ray setup

#: Ray loggers that, on a local Ray without the dashboard, only repeat that the state API is absent:
#: Ray Train's PlacementGroupCleaner asks for the controller's state about once a second and warns
#: each time it cannot, for the whole of every training run.
STATE_API_NOISE = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_state_api_warnings() -> None:
    """Worker setup hook (``runtime_env["worker_process_setup_hook"]``) for sdray's local Ray.

    Raises the :data:`STATE_API_NOISE` loggers to ERROR; every other Ray warning still shows.
    """
    for name in STATE_API_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


def ray_init_kwargs(address: str | None) -> dict[str, Any]:
    """``ray.init`` keywords: no dashboard, the S3 settings for workers, and on a local Ray
    (no ``address``) the :func:`quiet_state_api_warnings` hook."""
    runtime_env: dict[str, Any] = {}
    env = storage.s3_env()
    if env:
        runtime_env["env_vars"] = env
    if not address:
        runtime_env["worker_process_setup_hook"] = f"{__name__}.quiet_state_api_warnings"
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    return kwargs


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """``ray.init`` once with :func:`ray_init_kwargs`; ``address`` (or ``RAY_ADDRESS``) joins a cluster."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **ray_init_kwargs(address))
    else:
        ray.init(num_cpus=num_cpus, **ray_init_kwargs(None))


# ----------------------------------------------------------------------------- skip counts

def _tally_class():
    import ray

    @ray.remote(num_cpus=0)
    class _SkipTally:
        def __init__(self):
            self.counts: dict[str, int] = {}
            self.shards: dict[str, dict[str, int]] = {}

        def add(self, counts: dict, shard: str | None = None, read: int | None = None,
                dropped: int = 0) -> None:
            for k, v in counts.items():
                self.counts[k] = self.counts.get(k, 0) + int(v)
            if shard is not None:
                st = self.shards.setdefault(shard, {"read": -1, "dropped": 0, "skips": {}})
                if read is not None:
                    st["read"] = int(read)
                st["dropped"] += int(dropped)
                for k, v in counts.items():
                    st["skips"][k] = st["skips"].get(k, 0) + int(v)

        def get(self) -> dict:
            return {"counts": dict(self.counts),
                    "shards": {k: {**v, "skips": dict(v["skips"])} for k, v in self.shards.items()}}

    return _SkipTally


class SkipCounter:
    """Cluster-wide per-reason skip counts (a handle to a tiny actor; picklable)."""

    def __init__(self, handle):
        self.handle = handle

    @classmethod
    def create(cls) -> "SkipCounter":
        return cls(_tally_class().remote())

    def add(self, counts: dict, shard: str | None = None, read: int | None = None,
            dropped: int = 0) -> None:
        import ray

        if counts or shard is not None:
            ray.get(self.handle.add.remote(dict(counts), shard, read, dropped))

    def snapshot(self) -> dict:
        import ray

        return ray.get(self.handle.get.remote())

    def counts(self) -> dict[str, int]:
        return SkipCounts(self.snapshot()["counts"]).to_dict()

    def shards(self) -> dict[str, dict[str, int]]:
        """Per shard URI: ``read`` raw samples (-1 until the read finished), ``dropped`` while
        decoding, and ``skips`` (per-reason counts of that shard, read and decode together)."""
        return self.snapshot()["shards"]

    def close(self) -> None:
        import ray

        ray.kill(self.handle)


# ----------------------------------------------------------------------------- readers

def list_shards(uri: str) -> list[str]:
    """The ``.tar``/``.parquet`` shards under ``uri`` (a folder/prefix, or one shard), sorted;
    img2dataset's metadata ``NNNNN.parquet`` beside ``NNNNN.tar`` is a sidecar, not a shard."""
    try:
        files = storage.list_files(uri, SHARD_SUFFIXES)
    except storage.StorageError:
        raise
    except Exception as err:
        raise storage.explain_error(uri, err) from err
    listed = set(files)
    return [f for f in files if not is_sidecar(f, listed)]


def shard_ids(shards: list[str], root: str) -> dict[str, str]:
    """Shard URI -> its id (path under ``root`` without suffix; the prefix of its sample ids)."""
    return {s: shard_id(s, root) for s in shards}


def split_sample_id(sample_id: str, ids: set[str] | dict) -> tuple[str | None, str]:
    """``(shard id, key)`` of ``sample_id`` given the known shard ids (longest match wins,
    as both ids and keys may contain ``/``); ``(None, sample_id)`` when no id matches."""
    cut = len(sample_id)
    while (cut := sample_id.rfind("/", 0, cut)) > 0:
        if sample_id[:cut] in ids:
            return sample_id[:cut], sample_id[cut + 1:]
    return None, sample_id


def upstream_failures(shard_uri: str) -> dict[str, int]:
    """Download failures img2dataset recorded for this shard (``NNNNN_stats.json``), if any."""
    try:
        stats = storage.read_json(stats_uri(shard_uri))
    except FileNotFoundError:
        return {}
    if not isinstance(stats, dict):
        return {}
    keys = ("failed_to_download", "failed_to_resize")
    return {k: int(stats[k]) for k in keys if isinstance(stats.get(k), int) and stats[k]}


def _buffer_shuffle(items: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buf: list[dict] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(len(buf))
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for k in RAW_COLUMNS:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r[k] for r in rows]
        out[k] = arr
    return out


def read_shard_rows(shard_uri: str, counts: SkipCounts, max_caption_bytes: int,
                    shuffle_buffer: int = 0, seed: int = 0, shard: str | None = None,
                    storage_cfg: StorageConfig | None = None) -> list[dict]:
    """Every valid raw sample of one shard; bad data is counted in ``counts``.

    The shard is read in full first (retried per ``storage_cfg``); a storage fault that survives
    the retries raises :class:`~sdray.storage.ShardStorageError` (never an empty shard). ``shard``:
    the sample-id prefix (:func:`shard_ids`), default the file's base name.
    """
    import io

    data = storage.read_shard_bytes(shard_uri, storage_cfg)
    rows = list(iter_shard_samples(io.BytesIO(data), shard_uri, counts, max_caption_bytes, shard))
    if shuffle_buffer > 1:
        rng = random.Random(f"{seed}:{shard_uri}")
        rows = list(_buffer_shuffle(iter(rows), shuffle_buffer, rng))
    for r in rows:
        r["shard"] = shard_uri
    return rows


def retry_shard_tasks(ds, cfg: StorageConfig) -> None:
    """Let Ray Data retry a map task (``cfg.task_retries`` times, with its own backoff) that
    failed with :class:`~sdray.storage.ShardStorageError`; other errors fail at once. Set on the
    dataset's own context, which the datasets derived from it share."""
    ds.context.retried_map_errors = [storage.ShardStorageError.__name__]
    ds.context.max_map_retries = cfg.task_retries


def _read_shards(batch: dict, *, max_caption_bytes: int, shuffle_buffer: int, seed: int,
                 counter: SkipCounter | None, chunk: int, storage_cfg: dict):
    cfg = storage.configure_retries(storage_cfg, export_env=False)
    for shard_uri, sid in zip(batch["shard"], batch["shard_id"]):
        counts = SkipCounts()
        rows = read_shard_rows(str(shard_uri), counts, max_caption_bytes, shuffle_buffer, seed,
                               str(sid), cfg)
        if counter is not None:
            counter.add(counts, shard=str(shard_uri), read=len(rows))
        for i in range(0, len(rows), chunk):
            yield _columns(rows[i:i + chunk])


def _decode(batch: dict, *, preprocessor, max_pixels: int, image_size: int | None,
            counter: SkipCounter | None) -> dict:
    counts = SkipCounts()
    dropped: list = []
    out = decode_batch(batch, preprocessor, counts, max_pixels, image_size, dropped)
    if counter is not None and dropped:
        # attribute drops to their shards so consumers can tell when a shard is complete
        per: dict[str, SkipCounts] = {}
        for i, reason in dropped:
            per.setdefault(str(batch["shard"][i]), SkipCounts()).add(reason)
        for sh, c in per.items():
            counter.add(c, shard=sh, dropped=sum(c.values()))
    return out


def read_image_text(uri: str | list[str], data_cfg: DataConfig | None = None, preprocessor=None,
                    *, counter: SkipCounter | None = None, seed: int = 0,
                    image_size: int | None = None, decode: bool = True, root: str | None = None,
                    storage_cfg: StorageConfig | None = None):
    """A Ray Dataset of decoded samples from WebDataset tar / Parquet shards (local or s3://).

    Args:
        uri: a folder/prefix of shards, one shard, or an explicit list of shard URIs.
        data_cfg: shuffling, pixel and caption limits, batch size of the decode stage.
        preprocessor: a backbone :class:`~sdray.backbones.Preprocessor`; rows then hold
            ``pixels`` float32 (3,S,S), ``input_ids`` and ``attention_mask`` int64 (L,).
            Without one: ``pixels`` in [0,1] if ``image_size`` is given, else the ``image`` bytes
            of every decodable image.
        counter: where skip counts go (:meth:`SkipCounter.create`); ``None``: not collected.
        decode: ``False`` gives the raw rows (``image`` bytes, not yet decoded).
        root: the input root that sample ids are relative to when ``uri`` is a list
            (default: ``uri`` itself for a folder; base names for a list).
        storage_cfg: retries of the shard reads (default: :func:`sdray.storage.retry_config`).

    Every row also has ``sample_id``, ``image_id``, ``caption``, ``key``, ``url`` (img2dataset's
    source URL or ``None``), ``image_loc`` (where the image bytes sit in the shard,
    :mod:`sdray.data.locations`, or ``None``) and ``shard`` (the input shard URI). A shard that cannot be read
    after every retry fails the job with :class:`~sdray.storage.ShardStorageError`.
    """
    import ray

    cfg = data_cfg or DataConfig()
    scfg = storage_cfg or storage.retry_config()
    shards = list(uri) if isinstance(uri, (list, tuple)) else list_shards(uri)
    if not shards:
        raise FileNotFoundError(f"no .tar or .parquet shards under {uri}")
    ids = shard_ids(shards, root if isinstance(uri, (list, tuple)) else str(uri))
    if cfg.shuffle_files:
        random.Random(seed).shuffle(shards)
    ds = ray.data.from_items([{"shard": s, "shard_id": ids[s]} for s in shards],
                             override_num_blocks=len(shards))
    retry_shard_tasks(ds, scfg)
    ds = ds.map_batches(
        functools.partial(_read_shards, max_caption_bytes=cfg.max_caption_bytes,
                          shuffle_buffer=cfg.shuffle_buffer if cfg.shuffle_files else 0,
                          seed=seed, counter=counter, chunk=max(cfg.read_batch_size, 256),
                          storage_cfg=scfg.model_dump()),
        batch_size=1, batch_format="numpy", num_cpus=0.5)
    if not decode:
        return ds
    return ds.map_batches(
        functools.partial(_decode, preprocessor=preprocessor, max_pixels=cfg.max_image_pixels,
                          image_size=image_size, counter=counter),
        batch_size=cfg.read_batch_size, batch_format="numpy")


def feature_files(uri: str) -> list[str]:
    return [f for f in storage.list_files(uri, (".parquet",))]


def read_features(uri: str):
    """A Ray Dataset over the feature shards (Parquet) under ``uri`` written by featurize."""
    import ray

    files = feature_files(uri)
    if not files:
        raise FileNotFoundError(f"no feature shards (.parquet) under {uri}")
    fs, _ = storage.pyarrow_filesystem(uri)
    paths = [f[len("s3://"):] if f.startswith("s3://") else f for f in files]
    return ray.data.read_parquet(paths, filesystem=fs)


def is_feature_dir(uri: str) -> bool:
    """True if ``uri`` holds feature shards: featurize output (a ``manifest.json`` naming feature
    dims), or one split of it (Parquet files with an ``image_features`` column)."""
    try:
        m = storage.read_json(storage.join(uri, "manifest.json"))
    except (FileNotFoundError, ValueError):     # no manifest, or not JSON: look at the files
        m = None
    if isinstance(m, dict) and "image_dim" in m and "text_dim" in m:
        return True
    files = storage.list_files(uri, (".parquet",))
    if not files:
        return False
    fs, _ = storage.pyarrow_filesystem(uri)
    path = files[0][len("s3://"):] if files[0].startswith("s3://") else files[0]
    return "image_features" in pq.read_schema(path, filesystem=fs).names
