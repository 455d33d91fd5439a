"""``sdray export``: a model's dense + sparse vectors of a corpus as Parquet for vector databases.

    sdray export --model URI --corpus URI --out FILE.parquet [--side images|captions] [--top-terms N]
    sdray export --index URI --out FILE.parquet [--side images|captions]

``--corpus`` holds feature shards (``sdray featurize``; no backbone needed) or raw image-text
shards (decoded with Ray Data and run through the model's frozen backbone). ``--index`` reads the
vectors a published index stores instead (its current version; rows in index order, with the
index's ids). One row per unique image (``--side images``: what text queries search) or per
unique caption (``--side captions``).
Columns and scoring: :mod:`sdray.export`; loading recipes for Qdrant, Milvus and OpenSearch:
docs/guide.md §11.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np

from sdray import storage

log = logging.getLogger("pipelines.export")


def unique_items(cols: dict[str, Any], side: str) -> tuple[list[str], list[str], list[str], list[str], np.ndarray]:
    """``(ids, image_ids, captions, urls, features)`` with one row per unique image or caption
    (its first row; ``urls`` are "" where the corpus has none)."""
    from pipelines.index import caption_id

    key = "image_id" if side == "images" else "caption"
    first: dict[str, int] = {}
    for row, value in enumerate(cols[key]):
        first.setdefault(value, row)
    rows = list(first.values())
    image_ids = [cols["image_id"][r] for r in rows]
    captions = [cols["caption"][r] for r in rows]
    urls = [cols["url"][r] for r in rows] if "url" in cols else [""] * len(rows)
    ids = image_ids if side == "images" else [caption_id(c) for c in captions]
    feats = cols["image_features" if side == "images" else "text_features"][rows]
    return ids, image_ids, captions, urls, feats


def encode_features(model, feats: np.ndarray, side: str, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(B, H) pre-projection features -> dense (B, D) and sparse (B, V) numpy arrays."""
    from sdray.progress import Progress

    encode = model.encode_image_features if side == "images" else model.encode_text_features
    dense, sparse = [], []
    bar = Progress(f"export {side}", len(feats), "rows")
    for start in range(0, len(feats), batch_size):
        enc = encode(feats[start:start + batch_size])
        dense.append(enc.dense.numpy())
        sparse.append(enc.sparse.numpy())
        bar.update(len(enc.dense))
    bar.close()
    return np.concatenate(dense), np.concatenate(sparse)


def export(model_uri: str, corpus: str, out: str, side: str = "images", n_terms: int = 10) -> dict:
    """Write the export table of ``corpus`` to ``out``; returns ``{rows, out, side, ...}``."""
    from pipelines.evaluate import load_split
    from sdray.export import to_parquet_bytes, vectors_table
    from sdray.model import RetrievalModel

    model = RetrievalModel.load(model_uri)
    cols = load_split(corpus, model, extra=("url",))
    ids, image_ids, captions, urls, feats = unique_items(cols, side)
    dense, sparse = encode_features(model, feats, side)
    table = vectors_table(ids, image_ids, captions, urls, dense, sparse, model.vocabulary, n_terms,
                          meta={"side": side, "model": model_uri, "corpus": corpus})
    storage.write_bytes(out, to_parquet_bytes(table))
    nnz = float(np.mean([len(x) for x in table.column("sparse_indices").to_pylist()])) if len(ids) else 0.0
    return {"out": out, "side": side, "rows": len(ids), "dense_dim": int(dense.shape[1]),
            "vocab_size": int(sparse.shape[1]), "mean_nnz": round(nnz, 2)}


def export_index(index: str, out: str, side: str = "images", n_terms: int = 10) -> dict:
    """Write the vectors stored in the published index at ``index`` (no model needed)."""
    from sdray.export import to_parquet_bytes, vectors_table
    from sdray.index.csr import concat
    from sdray.index.retriever import Retriever

    retriever = Retriever.load(index, sides=[side])
    if retriever.vocabulary is None:
        raise ValueError(f"{index}: the index stores no vocabulary (vocab.json); export from --model/--corpus")
    shards = retriever.shards.get(side, [])
    dense = np.concatenate([sh.dense.vectors(np.arange(len(sh))) for sh in shards])
    sparse = concat([sh.docs for sh in shards])
    meta = {k: ["" if x is None else str(x) for sh in shards for x in sh.meta[k]]
            for k in ("id", "image_id", "caption", "url")}
    table = vectors_table(meta["id"], meta["image_id"], meta["caption"], meta["url"], dense, sparse,
                          retriever.vocabulary, n_terms,
                          meta={"side": side, "index": index, "version": retriever.manifest.get("version"),
                                "model": retriever.manifest.get("model")})
    storage.write_bytes(out, to_parquet_bytes(table))
    return {"out": out, "side": side, "rows": len(meta["id"]), "dense_dim": int(dense.shape[1]),
            "vocab_size": len(retriever.vocabulary), "mean_nnz": round(sparse.nnz / max(1, sparse.n_rows), 2)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model URI (folder or s3:// prefix); with --corpus")
    parser.add_argument("--corpus", default=None, help="feature shards or raw image-text shards; with --model")
    parser.add_argument("--index", default=None,
                        help="a published index whose stored vectors to export (instead of --model/--corpus)")
    parser.add_argument("--out", required=True, help="Parquet file to write (local path or s3://)")
    parser.add_argument("--side", choices=["images", "captions"], default="images",
                        help="export images (searched by text queries) or captions (searched by images)")
    parser.add_argument("--top-terms", type=int, default=10, help="word pieces kept in the top_terms column")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON (last line)")


def main(args: argparse.Namespace) -> int:
    import json

    if args.index and (args.model or args.corpus):
        raise ValueError("give --index, or --model with --corpus, not both")
    if args.index:
        summary = export_index(args.index, args.out, args.side, args.top_terms)
    elif args.model and args.corpus:
        summary = export(args.model, args.corpus, args.out, args.side, args.top_terms)
    else:
        raise ValueError("give --model and --corpus (or --index)")
    log.info("exported %d %s to %s (dense %d, mean nnz %.1f)", summary["rows"], summary["side"],
             summary["out"], summary["dense_dim"], summary["mean_nnz"])
    if args.json:
        print(json.dumps(summary))
    return 0
