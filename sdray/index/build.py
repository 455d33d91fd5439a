"""Build a whole sharded index in one process (the Ray job in ``pipelines/index.py`` does the same
per shard in parallel): split rows into N shards, build and save each, publish the manifest.

Rows go to shard ``crc32(id) % N``, a stable assignment, so a re-run after an interruption
rebuilds exactly the missing shards of the pending version.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Callable

import numpy as np

from sdray import storage
from sdray.index import manifest as mf
from sdray.index.config import IndexConfig
from sdray.index.shard import Shard, ShardData


def shard_of(ids: list[str], n_shards: int) -> np.ndarray:
    """Stable shard number of every id."""
    return np.array([zlib.crc32(str(i).encode("utf-8")) % n_shards for i in ids], dtype=np.int64)


def split(data: ShardData, n_shards: int) -> list[ShardData]:
    """Split one side's rows into ``n_shards`` parts by :func:`shard_of` (order kept)."""
    where = shard_of(data.ids, n_shards)
    parts = []
    for s in range(n_shards):
        rows = np.flatnonzero(where == s)
        parts.append(
            ShardData(
                dense=data.dense[rows],
                sparse=data.sparse.take(rows),
                ids=[data.ids[i] for i in rows],
                image_ids=[data.image_ids[i] for i in rows],
                captions=[data.captions[i] for i in rows],
                uris=[data.uris[i] for i in rows],
                doc_no=data.doc_no[rows],
                vocab_size=data.sparse.dim,
            )
        )
    return parts


def build_shard(out: str, version: str, shard: int, sides: dict[str, ShardData], config: IndexConfig) -> dict:
    """Build and save one shard (every side); returns ``{side: shard.json}``."""
    infos = {}
    for side, data in sides.items():
        built = Shard.build(data, config, name=mf.shard_name(shard))
        infos[side] = built.save(mf.shard_uri(out, version, shard, side))
    return infos


def build_index(
    out: str,
    sides: dict[str, ShardData],
    n_shards: int = 1,
    config: IndexConfig | None = None,
    *,
    model: str | None = None,
    fusion: dict | None = None,
    vocabulary: list[str] | None = None,
    version: str | None = None,
    inputs: Any = None,
    on_shard: Callable[[int], None] | None = None,
) -> str:
    """Build ``n_shards`` shards of every side under ``out`` and publish them; returns the version.

    ``inputs`` (default: model, config, shard count, counts) fingerprints the build: a re-run with
    the same fingerprint resumes an interrupted build's version and skips completed shards.
    """
    config = config or IndexConfig()
    if n_shards < 1:
        raise ValueError("n_shards must be >= 1")
    fp = mf.fingerprint(
        inputs
        if inputs is not None
        else {"model": model, "config": config.model_dump(), "shards": n_shards, "counts": {s: len(d.ids) for s, d in sides.items()}}
    )
    version, _ = mf.begin_build(out, fp, version)
    split_sides = {side: split(data, n_shards) for side, data in sides.items()}
    infos = []
    for s in range(n_shards):
        done = mf.shard_done(out, version, s, tuple(sides))
        if done is None:
            done = build_shard(out, version, s, {side: parts[s] for side, parts in split_sides.items()}, config)
        infos.append(done)
        if on_shard is not None:
            on_shard(s)
    if vocabulary is not None:
        storage.write_bytes(storage.join(out, version, mf.VOCAB), json.dumps(list(vocabulary)).encode("utf-8"))
    manifest = mf.make_manifest(
        version, infos, model=model, config=config.model_dump(), fusion=fusion, has_vocab=vocabulary is not None
    )
    mf.publish(out, version, manifest)
    return version
