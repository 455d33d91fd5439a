"""How many samples a corpus holds, without reading it all (the index job's shard count, the
training schedule).

- **Feature shards** (Parquet from ``sdray featurize``): exact. The featurize manifest's
  ``n_samples`` when the corpus root has one, else the sum of the Parquet footers' row counts
  (footers only, read in parallel threads).
- **Raw Parquet image–text shards**: exact row counts from the footers (rows whose caption is
  later found bad are included: an upper bound of the valid samples by the skipped ones).
- **Raw WebDataset tar shards** have no row count anywhere but their bytes. Up to
  ``sample_shards`` tars spread over the sorted list are read (the same reader the jobs use, so the
  same samples count) and the count is scaled by total bytes / sampled bytes. With at most
  ``sample_shards`` tars that is an exact count; otherwise an estimate whose error is the spread
  of bytes per sample across shards.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sdray import storage

FOOTER_THREADS = 16


@dataclass(frozen=True)
class CorpusSize:
    """``rows``: samples (exact or estimated); ``exact``: whether ``rows`` was counted."""

    rows: int
    exact: bool


def _arrow_path(uri: str) -> str:
    return uri[len("s3://"):] if uri.startswith("s3://") else uri


def parquet_rows(files: list[str]) -> int:
    """Sum of the Parquet footers' ``num_rows`` (one small read per file, in parallel)."""
    import pyarrow.parquet as pq

    if not files:
        return 0
    fs, _ = storage.pyarrow_filesystem(files[0])

    def rows(uri: str) -> int:
        return pq.read_metadata(_arrow_path(uri), filesystem=fs).num_rows

    with ThreadPoolExecutor(min(FOOTER_THREADS, len(files))) as pool:
        return int(sum(pool.map(rows, files)))


def file_sizes(files: list[str]) -> dict[str, int]:
    """Bytes of each file, from one recursive listing per distinct parent prefix."""
    sizes: dict[str, int] = {}
    parents = sorted({f.rsplit("/", 1)[0] for f in files})
    for parent in parents:
        fs, path = storage.filesystem(parent)
        for p, info in fs.find(path, detail=True, maxdepth=1).items():
            sizes[p] = int(info.get("size") or 0)
    out = {}
    for f in files:
        fs, path = storage.filesystem(f)
        out[f] = sizes[path] if path in sizes else int(fs.size(path))
    return out


def feature_corpus_size(uri: str) -> CorpusSize:
    from pipelines.datasets import feature_files

    try:
        manifest = storage.read_json(storage.join(uri, "manifest.json"))
    except FileNotFoundError:
        manifest = None
    if isinstance(manifest, dict) and isinstance(manifest.get("n_samples"), int):
        return CorpusSize(int(manifest["n_samples"]), True)
    files = feature_files(uri)
    if not files:
        raise FileNotFoundError(f"no feature shards (.parquet) under {uri}")
    return CorpusSize(parquet_rows(files), True)


def raw_corpus_size(uri: str, data_cfg=None, sample_shards: int = 4) -> CorpusSize:
    """Samples in raw image–text shards (see the module docstring); starts Ray for the tar sample."""
    from pipelines.datasets import list_shards, read_image_text

    shards = list_shards(uri)
    parquet = [s for s in shards if s.endswith(".parquet")]
    tars = [s for s in shards if not s.endswith(".parquet")]
    rows = parquet_rows(parquet)
    if not tars:
        return CorpusSize(rows, True)
    if len(tars) <= sample_shards:
        return CorpusSize(rows + int(read_image_text(tars, data_cfg, decode=False).count()), True)
    step = len(tars) / sample_shards
    sample = [tars[int(i * step)] for i in range(sample_shards)]
    counted = int(read_image_text(sample, data_cfg, decode=False).count())
    sizes = file_sizes(tars)
    sampled_bytes = sum(sizes[s] for s in sample)
    if sampled_bytes <= 0:
        raise ValueError(f"{uri}: sampled shards are empty; cannot estimate the corpus size")
    return CorpusSize(rows + int(math.ceil(counted * sum(sizes.values()) / sampled_bytes)), False)
