"""Per-reason counts of skipped input (DESIGN.md §3, "Bad input never stops a job")."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

# Every reason a sample (or a whole shard, or a stray tar member) is skipped.
IMAGE_UNDECODABLE = "image_undecodable"      # not an image PIL can read
IMAGE_TRUNCATED = "image_truncated"          # a valid header but the data stops early
IMAGE_TOO_LARGE = "image_too_large"          # over DataConfig.max_image_pixels (decompression bomb)
IMAGE_MISSING = "image_missing"              # a caption/json without an image member or column
IMAGE_EMPTY = "image_empty"                  # a zero-byte image
CAPTION_MISSING = "caption_missing"          # an image without a caption
CAPTION_EMPTY = "caption_empty"              # only whitespace
CAPTION_NOT_UTF8 = "caption_not_utf8"        # bytes that are not UTF-8
CAPTION_TOO_LONG = "caption_too_long"        # over DataConfig.max_caption_bytes
STRAY_MEMBER = "stray_member"                # a tar member that belongs to no known field
BAD_METADATA = "bad_metadata"                # KEY.json that is not a JSON object (sample kept)
DUPLICATE_KEY = "duplicate_key"              # a second sample with the same key in one shard
SHARD_UNREADABLE = "shard_unreadable"        # a shard that cannot be opened or parsed at all
SHARD_TRUNCATED = "shard_truncated"          # a tar that ends early (samples before it are kept)
DOWNLOAD_FAILED = "download_failed"          # an img2dataset row whose download had failed upstream

REASONS = (
    IMAGE_UNDECODABLE, IMAGE_TRUNCATED, IMAGE_TOO_LARGE, IMAGE_MISSING, IMAGE_EMPTY,
    CAPTION_MISSING, CAPTION_EMPTY, CAPTION_NOT_UTF8, CAPTION_TOO_LONG, STRAY_MEMBER,
    BAD_METADATA, DUPLICATE_KEY, SHARD_UNREADABLE, SHARD_TRUNCATED, DOWNLOAD_FAILED,
)
# Reasons that count members/shards/notes rather than dropped samples.
NOT_SAMPLES = (STRAY_MEMBER, BAD_METADATA, SHARD_UNREADABLE, SHARD_TRUNCATED)


class SkipCounts(Counter):
    """A ``Counter`` of reason -> count with JSON-friendly helpers."""

    def add(self, reason: str, n: int = 1) -> None:
        self[reason] += n

    def merge(self, other: Mapping[str, int] | Iterable) -> "SkipCounts":
        self.update(dict(other))
        return self

    def to_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.items()) if v}

    @property
    def samples_skipped(self) -> int:
        """Dropped samples (stray members, metadata notes and whole shards excluded)."""
        return int(sum(v for k, v in self.items() if k not in NOT_SAMPLES))

    def summary(self) -> str:
        d = self.to_dict()
        if not d:
            return "no bad input"
        return ", ".join(f"{k}={v}" for k, v in d.items())
