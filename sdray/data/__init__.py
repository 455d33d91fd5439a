"""Image–text data without Ray: shard formats, decoding with skip counts, synthetic scenes."""

from sdray.data.skips import REASONS, SkipCounts
from sdray.data.formats import (
    iter_shard_samples, iter_tar_samples, iter_parquet_samples, write_tar_shard,
    tar_shard_bytes, parquet_shard_bytes, shard_name,
)
from sdray.data.decode import decode_image, decode_batch, resize_square

__all__ = [
    "REASONS", "SkipCounts", "iter_shard_samples", "iter_tar_samples", "iter_parquet_samples",
    "write_tar_shard", "tar_shard_bytes", "parquet_shard_bytes", "shard_name", "decode_image",
    "decode_batch", "resize_square",
]
