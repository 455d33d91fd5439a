"""Learned vectors as a Parquet table that vector databases load (Qdrant, Milvus, OpenSearch).

One row per exported item (an image, or a caption)::

    id              string          the index's document id (image_id for images, c<sha1> for captions)
    image_id        string
    caption         string          an image's first caption / the caption itself
    url             string          source URL when the corpus has one, else ""
    dense           list<float32>   (D,) L2-normalised: cosine = inner product
    sparse_indices  list<int32>     increasing term ids (word pieces of the text vocabulary)
    sparse_values   list<float32>   their non-negative weights: sparse score = dot product
    top_terms       list<string>    the ``top_terms`` heaviest word pieces, heaviest first

Scores match sdray's: dense ``d_q · d_doc`` (inner product of unit vectors), sparse
``Σ_v z_q[v] · z_doc[v]`` over shared term ids (DESIGN.md §1). The file's metadata
(``sdray`` key) holds the dimension, vocabulary size, side and the model URI.
"""

from __future__ import annotations

import io
import json
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_FIELDS = ("id", "image_id", "caption", "url", "dense", "sparse_indices", "sparse_values",
                 "top_terms")


def sparse_rows(sparse) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(B, V) non-negative matrix or :class:`~sdray.index.csr.CSR` -> per row the increasing
    non-zero ids (int32) and their values (float32)."""
    ids, vals = [], []
    if hasattr(sparse, "row"):  # CSR: rows are already sorted and non-zero
        for i in range(sparse.n_rows):
            r_ids, r_vals = sparse.row(i)
            keep = r_vals > 0
            ids.append(np.asarray(r_ids[keep], np.int32))
            vals.append(np.asarray(r_vals[keep], np.float32))
        return ids, vals
    for row in np.asarray(sparse, np.float32):
        nz = np.flatnonzero(row > 0).astype(np.int32)
        ids.append(nz)
        vals.append(row[nz].astype(np.float32))
    return ids, vals


def top_terms(ids: np.ndarray, vals: np.ndarray, vocabulary: Sequence[str], n: int) -> list[str]:
    """The ``n`` heaviest terms of one sparse row, heaviest first (ties: lower id first)."""
    order = np.lexsort((ids, -vals))[:n]
    return [vocabulary[int(ids[j])] for j in order]


def vectors_table(ids: Sequence[str], image_ids: Sequence[str], captions: Sequence[str],
                  urls: Sequence[str] | None, dense: np.ndarray, sparse,
                  vocabulary: Sequence[str], n_terms: int = 10, meta: dict | None = None) -> pa.Table:
    """The export table of B items: ``dense`` (B, D) numpy, ``sparse`` (B, V) numpy or CSR."""
    dense = np.ascontiguousarray(dense, np.float32)
    b = len(ids)
    rows, width = (sparse.n_rows, sparse.dim) if hasattr(sparse, "row") else sparse.shape
    if dense.shape[0] != b or rows != b:
        raise ValueError(f"{b} ids but {dense.shape[0]} dense and {rows} sparse rows")
    if width != len(vocabulary):
        raise ValueError(f"sparse width {width} != vocabulary size {len(vocabulary)}")
    s_ids, s_vals = sparse_rows(sparse)
    table = pa.table({
        "id": pa.array(list(ids), pa.string()),
        "image_id": pa.array(list(image_ids), pa.string()),
        "caption": pa.array(list(captions), pa.string()),
        "url": pa.array(list(urls) if urls is not None else [""] * b, pa.string()),
        "dense": pa.array(list(dense), pa.list_(pa.float32())),
        "sparse_indices": pa.array(s_ids, pa.list_(pa.int32())),
        "sparse_values": pa.array(s_vals, pa.list_(pa.float32())),
        "top_terms": pa.array([top_terms(i, v, vocabulary, n_terms) for i, v in zip(s_ids, s_vals)],
                              pa.list_(pa.string())),
    })
    info = {"dense_dim": int(dense.shape[1]), "vocab_size": len(vocabulary), **(meta or {})}
    return table.replace_schema_metadata({"sdray": json.dumps(info, sort_keys=True)})


def to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_vectors(data: bytes) -> tuple[pa.Table, dict]:
    """An export file's table and its ``sdray`` metadata."""
    table = pq.read_table(io.BytesIO(data))
    missing = [f for f in SCHEMA_FIELDS if f not in table.column_names]
    if missing:
        raise ValueError(f"not an sdray export: missing columns {missing}")
    raw = (table.schema.metadata or {}).get(b"sdray")
    return table, json.loads(raw) if raw else {}
