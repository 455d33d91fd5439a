"""Image bytes for thumbnails, read back from where the index says a document came from.

An index row's ``uri`` (``meta.parquet``) may be:

* ``<shard uri>#<key>`` (or ``::<key>``): sample ``key`` of a WebDataset tar / Parquet corpus
  shard (local path or ``s3://``). The shard is scanned once and its images kept in a small LRU;
* a plain file URI (local path or ``s3://``) of an image file;
* a ``data:image/...;base64,`` URI.

:func:`thumbnail` shrinks any of these to a JPEG of at most ``size`` pixels a side.
"""

from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict

from PIL import Image

from sdray import storage
from sdray.data.decode import decode_image
from sdray.data.formats import iter_shard_samples
from sdray.data.skips import SkipCounts

_SHARD_CACHE: OrderedDict[str, dict[str, bytes]] = OrderedDict()
_SHARD_CACHE_MAX = 4
_LOCK = threading.Lock()


def split_uri(uri: str) -> tuple[str, str | None]:
    """``(file or shard uri, sample key or None)``."""
    for sep in ("::", "#"):
        if sep in uri and not uri.startswith("data:"):
            base, key = uri.rsplit(sep, 1)
            return base, key
    return uri, None


def _shard_images(shard_uri: str) -> dict[str, bytes]:
    with _LOCK:
        got = _SHARD_CACHE.get(shard_uri)
        if got is not None:
            _SHARD_CACHE.move_to_end(shard_uri)
            return got
    images: dict[str, bytes] = {}
    with storage.open_uri(shard_uri, "rb") as f:
        for sample in iter_shard_samples(f, shard_uri, SkipCounts()):
            key = sample["sample_id"].split("/", 1)[-1]
            images[key] = sample["image"]
            images.setdefault(sample["sample_id"], sample["image"])
            images.setdefault(sample["image_id"], sample["image"])
    with _LOCK:
        _SHARD_CACHE[shard_uri] = images
        while len(_SHARD_CACHE) > _SHARD_CACHE_MAX:
            _SHARD_CACHE.popitem(last=False)
    return images


def read_image_bytes(uri: str) -> bytes:
    """The original image bytes behind ``uri`` (see module docstring); KeyError if absent."""
    if uri.startswith("data:"):
        _, _, payload = uri.partition(",")
        return base64.b64decode(payload)
    base, key = split_uri(uri)
    if key is None:
        return storage.read_bytes(base)
    images = _shard_images(base)
    if key not in images:
        raise KeyError(f"sample {key!r} not found in {base}")
    return images[key]


def thumbnail(data: bytes, size: int = 256, max_pixels: int = 40_000_000) -> bytes:
    """JPEG bytes of ``data`` shrunk to at most ``size`` a side; ValueError if undecodable."""
    im, reason = decode_image(data, max_pixels)
    if im is None:
        raise ValueError(f"stored image cannot be decoded ({reason})")
    im.thumbnail((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()
