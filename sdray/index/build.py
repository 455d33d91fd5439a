"""Build a whole sharded index in one process (the Ray job in ``pipelines/index.py`` does the same
per shard in parallel): split rows into N shards, build and save each, publish the manifest.

Routing: a document's ``doc_no`` is a 63-bit hash of its id (:func:`doc_hash`; the id is the
image_id for images and a hash of the exact text for captions, i.e. the dedupe key) and it goes to
shard ``doc_no % N``. The assignment is stable, so a re-run after an interruption rebuilds exactly
the missing shards of the pending version, and every copy of a document lands in the same shard,
so dedupe is exact within a shard. ``doc_no`` also breaks score ties; a hash collision can only
happen inside one shard (equal hashes, equal residues) and is resolved there
(:func:`unique_doc_no`), so ``doc_no`` is unique across the index however it is sharded.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import numpy as np

from sdray import storage
from sdray.index import manifest as mf
from sdray.index.config import IndexConfig
from sdray.index.csr import CSR
from sdray.index.shard import Shard, ShardData


DOC_NO_BITS = 63


def doc_hash(doc_id: str) -> int:
    """A document's ``doc_no`` before collision handling: the first 63 bits of BLAKE2b(id)."""
    digest = hashlib.blake2b(str(doc_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - DOC_NO_BITS)


def shard_of(ids: list[str], n_shards: int) -> np.ndarray:
    """Stable shard number of every id: ``doc_hash(id) % n_shards``."""
    return np.array([doc_hash(i) % n_shards for i in ids], dtype=np.int64)


def unique_doc_no(doc_no: np.ndarray, ids: list[str], n_shards: int) -> np.ndarray:
    """``doc_no`` of one shard's distinct documents with hash collisions resolved.

    Colliding documents share a residue mod ``n_shards`` and hence a shard; the one with the
    smaller id keeps the hash, the others move up by multiples of ``n_shards`` (same residue, so
    no other shard can hold the new value) to the next free value.
    """
    doc_no = np.asarray(doc_no, np.int64).copy()
    if len(np.unique(doc_no)) == len(doc_no):
        return doc_no
    taken: set[int] = set()
    for i in sorted(range(len(doc_no)), key=lambda j: (int(doc_no[j]), ids[j])):
        d = int(doc_no[i])
        while d in taken:
            d = d + n_shards if d + n_shards < 2**DOC_NO_BITS else d % n_shards
        taken.add(d)
        doc_no[i] = d
    return doc_no


def dedupe_rows(table):
    """One shard side's encoded rows, one per document: the representative sample of each ``id``
    is the one with the smallest ``sample_id`` (today's "first occurrence in sample_id order").

    ``table``: a pyarrow table with at least ``id`` and ``sample_id``; returns the kept rows
    sorted by ``sample_id``. Pure pyarrow/NumPy, no per-row Python objects besides the two keys.
    """
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("id", "ascending"), ("sample_id", "ascending")])
    ids = pc.take(table.column("id"), order).to_numpy(zero_copy_only=False)
    first = np.ones(len(ids), bool)
    first[1:] = ids[1:] != ids[:-1]
    kept = table.take(pc.take(order, np.flatnonzero(first)))
    return kept.take(pc.sort_indices(kept, sort_keys=[("sample_id", "ascending")]))


def shard_data_from_rows(table, n_shards: int, vocab_size: int, dense_dim: int) -> ShardData:
    """:class:`ShardData` of one shard side from its encoded rows (duplicates allowed).

    ``table`` columns: ``id, sample_id, image_id, caption, uri`` and optional ``url``, ``image_loc`` (strings), ``doc_no`` (int64
    hash, :func:`doc_hash`), ``dense`` (fixed_size_list<float32>[D]), ``sp_idx`` (list<int32>,
    increasing term ids) and ``sp_val`` (list<float32>). Rows are deduplicated with
    :func:`dedupe_rows`; the sparse vectors go straight from Arrow list offsets to a CSR.
    """
    rows = dedupe_rows(table).combine_chunks() if table is not None else None
    n = 0 if rows is None else rows.num_rows
    if n == 0:
        return ShardData(dense=np.zeros((0, dense_dim), np.float32),
                         sparse=CSR(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), vocab_size),
                         ids=[], vocab_size=vocab_size)
    dense = np.asarray(rows.column("dense").chunk(0).flatten().to_numpy(zero_copy_only=False), np.float32)
    idx, val = rows.column("sp_idx").chunk(0), rows.column("sp_val").chunk(0)
    offsets = np.asarray(idx.offsets.to_numpy(), np.int64)
    indptr = offsets - offsets[0]
    indices = np.asarray(idx.flatten().to_numpy(zero_copy_only=False), np.int32)
    values = np.asarray(val.flatten().to_numpy(zero_copy_only=False), np.float32)
    ids = rows.column("id").to_pylist()
    return ShardData(dense=dense.reshape(n, dense_dim), sparse=CSR(indptr, indices, values, vocab_size), ids=ids,
                     image_ids=rows.column("image_id").to_pylist(), captions=rows.column("caption").to_pylist(),
                     uris=rows.column("uri").to_pylist(),
                     urls=rows.column("url").to_pylist() if "url" in rows.column_names else None,
                     image_locs=rows.column("image_loc").to_pylist() if "image_loc" in rows.column_names else None,
                     doc_no=unique_doc_no(rows.column("doc_no").to_numpy(), ids, n_shards), vocab_size=vocab_size)


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
                urls=[data.urls[i] for i in rows],
                image_locs=[data.image_locs[i] for i in rows],
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
