"""Image bytes for thumbnails, read back from where the index says a document came from.

An index row's ``uri`` (``meta.parquet``) may be:

* ``<shard uri>#<key>`` (or ``::<key>``): sample ``key`` of a WebDataset tar / Parquet corpus
  shard (local path or ``s3://``). A tar is never read whole: its 512-byte member headers are
  walked with seeks (:func:`tar_members`, cached per shard: name → (offset, size)) and only the
  member's bytes are read (a range request on object storage). A Parquet shard is scanned once
  and its images kept in a small LRU;
* a plain file URI (local path or ``s3://``) of an image file;
* a ``data:image/...;base64,`` URI.

:func:`thumbnail` shrinks any of these to a JPEG of at most ``size`` pixels a side.

Storage reads are retried per :class:`~sdray.config.StorageConfig`; a missing object or sample is
``FileNotFoundError``/``KeyError`` (the endpoint's 404), a fault past the retries a
:class:`~sdray.storage.StorageError` (its 503).
"""

from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict

from PIL import Image

from sdray import storage
from sdray.data.decode import decode_image
from sdray.data.formats import IMAGE_EXTS, iter_shard_samples
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
    data = storage.read_bytes(shard_uri)  # retried; a fault past the retries raises, never a short shard
    with io.BytesIO(data) as f:         # read whole first: a parse error here is bad data, not a fault
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


_TAR_INDEX: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
_TAR_INDEX_MAX = 64
BLOCK = 512


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    if text[:1] and text[0] & 0x80:  # GNU base-256 size
        return int.from_bytes(field[1:], "big")
    return int(text or b"0", 8)


def tar_members(f) -> dict[str, tuple[int, int]]:
    """``{member name: (data offset, size)}`` of a tar file object, reading headers only (seeks).

    Handles ustar prefixes, GNU long names (``L``) and pax ``path`` records (``x``).
    """
    out: dict[str, tuple[int, int]] = {}
    pos, long_name = 0, None
    while True:
        f.seek(pos)
        header = f.read(BLOCK)
        if len(header) < BLOCK or header == b"\0" * BLOCK:
            return out
        size = _octal(header[124:136])
        kind = header[156:157]
        data = pos + BLOCK
        if kind in (b"L", b"x"):
            f.seek(data)
            extra = f.read(min(size, 1 << 16))
            if kind == b"L":
                long_name = extra.rstrip(b"\0").decode("utf-8", "replace")
            else:
                for rec in extra.decode("utf-8", "replace").split("\n"):
                    if " path=" in rec:
                        long_name = rec.split(" path=", 1)[1]
        else:
            name = header[0:100].rstrip(b"\0").decode("utf-8", "replace")
            prefix = header[345:500].rstrip(b"\0").decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
            if kind in (b"0", b"\0"):
                out[long_name or (f"{prefix}/{name}" if prefix else name)] = (data, size)
            long_name = None
        pos = data + (size + BLOCK - 1) // BLOCK * BLOCK


def _tar_member(shard_uri: str, key: str) -> bytes | None:
    """The image bytes of sample ``key`` (None if the tar has no such member); storage I/O only."""
    with _LOCK:
        members = _TAR_INDEX.get(shard_uri)
    with storage.open_uri(shard_uri, "rb") as f:
        if members is None:
            members = tar_members(f)
            with _LOCK:
                _TAR_INDEX[shard_uri] = members
                while len(_TAR_INDEX) > _TAR_INDEX_MAX:
                    _TAR_INDEX.popitem(last=False)
        for ext in IMAGE_EXTS:
            for name in (f"{key}.{ext}", f"{key}.{ext.upper()}"):
                if name in members:
                    offset, size = members[name]
                    f.seek(offset)
                    data = f.read(size)
                    if len(data) != size:
                        raise OSError(f"{shard_uri}: member {name} cut short ({len(data)} of {size} bytes)")
                    return data
    return None


def _tar_image(shard_uri: str, key: str) -> bytes:
    """Retried per :class:`~sdray.config.StorageConfig`: a missing shard raises
    ``FileNotFoundError`` at once (a 404), a fault that outlives the retries
    :class:`~sdray.storage.ShardStorageError` (a 503), never ``KeyError``."""
    data = storage.call_with_retries(lambda: _tar_member(shard_uri, key), f"reading sample {key!r} of {shard_uri}")
    if data is None:
        raise KeyError(f"sample {key!r} not found in {shard_uri}")
    return data


def read_image_bytes(uri: str) -> bytes:
    """The original image bytes behind ``uri`` (see module docstring).

    Raises ``KeyError`` / ``FileNotFoundError`` when the sample or object does not exist, and
    :class:`~sdray.storage.StorageError` (an ``OSError``) when the store failed past its retries:
    a fault never looks like a missing image."""
    if uri.startswith("data:"):
        _, _, payload = uri.partition(",")
        return base64.b64decode(payload)
    base, key = split_uri(uri)
    if key is None:
        return storage.read_bytes(base)
    if base.endswith(".tar"):
        return _tar_image(base, key)
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
