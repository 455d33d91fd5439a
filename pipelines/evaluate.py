"""``sdray eval --model URI --data URI [--json]``: recall and sparsity of a model on a split.

``--data`` may be feature shards (``sdray featurize`` output: read with pyarrow, no Ray) or raw
image–text shards (decoded with Ray Data, encoded by the model's frozen backbone in this process).
Prints a readable table; with ``--json`` the DESIGN.md §4 object is the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from pipelines.datasets import is_feature_dir
from sdray import storage


def _fixed_list(col, dtype=np.float32) -> np.ndarray:
    import pyarrow as pa

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    width = arr.type.list_size
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, width)


FEATURE_SPLIT_COLUMNS = ("image_id", "caption", "input_ids", "text_features", "image_features")


def read_feature_columns(uri: str, columns: tuple[str, ...] = FEATURE_SPLIT_COLUMNS) -> dict[str, Any]:
    """All feature rows under ``uri`` as in-memory columns (pyarrow; no Ray). Each file is read
    whole first (retried; a storage fault raises :class:`~sdray.storage.ShardStorageError` naming
    the file), then parsed."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    files = storage.list_files(uri, (".parquet",))
    if not files:
        raise FileNotFoundError(f"no feature shards (.parquet) under {uri}")
    tables = []
    for f in files:
        t = pq.read_table(io.BytesIO(storage.read_bytes(f)))
        tables.append(t.select([c for c in columns if c in t.column_names]))
    table = pa.concat_tables(tables)
    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name)
        if name in ("text_features", "image_features"):
            out[name] = _fixed_list(col)
        elif name == "input_ids":
            out[name] = [np.asarray(x, np.int64) for x in col.to_pylist()]
        else:   # strings; a missing url or key (no img2dataset source) reads as ""
            out[name] = ["" if x is None else str(x) for x in col.to_pylist()]
    return out


def features_from_raw(uri: str, model, batch_size: int = 64) -> dict[str, Any]:
    """Decode raw shards with Ray Data and run the model's frozen backbone here."""
    import torch

    from pipelines.datasets import ensure_ray, read_image_text

    ensure_ray()
    ds = read_image_text(uri, model.config.data, model.preprocessor)
    cols: dict[str, list] = {"image_id": [], "caption": [], "url": [], "input_ids": [], "text_features": [],
                             "image_features": []}
    backbone = model.backbone
    with torch.no_grad():
        for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            ids = torch.as_tensor(np.asarray(b["input_ids"]), dtype=torch.long)
            mask = torch.as_tensor(np.asarray(b["attention_mask"]), dtype=torch.long)
            cols["text_features"].append(backbone.text_features(ids, mask).float().numpy())
            cols["image_features"].append(
                backbone.image_features(torch.as_tensor(np.asarray(b["pixels"]), dtype=torch.float32)).float().numpy())
            cols["image_id"] += [str(x) for x in b["image_id"]]
            cols["caption"] += [str(x) for x in b["caption"]]
            cols["url"] += ["" if x is None else str(x) for x in b["url"]]
            cols["input_ids"] += [r[m.astype(bool)] for r, m in zip(ids.numpy(), mask.numpy())]
    if not cols["image_id"]:
        raise ValueError(f"no valid samples in {uri}")
    cols["text_features"] = np.concatenate(cols["text_features"])
    cols["image_features"] = np.concatenate(cols["image_features"])
    return cols


def load_split(uri: str, model=None, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Feature columns of a split: feature shards directly, raw shards through the backbone.
    ``extra``: more feature-shard columns to read when present (e.g. ``url``; raw shards give ``url``)."""
    if is_feature_dir(uri):
        return read_feature_columns(uri, FEATURE_SPLIT_COLUMNS + tuple(extra))
    if model is None:
        raise ValueError(f"{uri} holds raw image-text shards; a model (backbone) is needed")
    return features_from_raw(uri, model)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model URI (folder or s3:// prefix)")
    parser.add_argument("--data", required=True, help="split: feature shards or raw image-text shards")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    parser.add_argument("--fusion", choices=["raw", "calibrated", "rrf"], default=None,
                        help="hybrid fusion (default: the model config's)")
    parser.add_argument("--all-fusions", action="store_true",
                        help="also report hybrid_raw, hybrid_calibrated, hybrid_zscore, hybrid_rrf")
    parser.add_argument("--index", default=None,
                        help="evaluate through this published index (sdray index --out) instead of brute force")


def all_fusions(cfg, tau: float) -> dict[str, dict[str, Any]]:
    w1, w2 = cfg.fusion_weights()
    return {"raw": {"method": "raw", "w1": w1, "w2": w2},
            "calibrated": {"method": "calibrated", "w1": w1, "w2": w2, "tau": tau},
            "zscore": {"method": "calibrated", "w1": w1, "w2": w2, "tau": tau, "normalize": "zscore"},
            "rrf": {"method": "rrf", "k_rrf": cfg.fusion.rrf_k}}


def evaluate_uri(model_uri: str, data_uri: str, fusion: str | None = None,
                 extra: bool = False, index: str | None = None) -> dict[str, Any]:
    from sdray.evaluation import evaluate_features
    from sdray.model import RetrievalModel

    model = RetrievalModel.load(model_uri)
    cfg = model.config
    if fusion:
        cfg = cfg.model_copy(deep=True)
        cfg.fusion.method = fusion
    data = load_split(data_uri, model)
    if index:
        from sdray.index.evaluate import evaluate_index_uri

        return evaluate_index_uri(index, model, data, cfg)
    return evaluate_features(model.heads, data, cfg, all_fusions(cfg, model.tau) if extra else None)


def main(args: argparse.Namespace) -> int:
    from sdray.evaluation import format_table

    result = evaluate_uri(args.model, args.data, args.fusion, args.all_fusions,
                          getattr(args, "index", None))
    print(f"model {args.model} on {args.data}")
    print(format_table(result))
    if args.json:
        print(json.dumps(result))
    return 0
