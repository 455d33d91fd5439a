"""Image bytes for thumbnails, read back from where the index says a document came from.

An index row's ``uri`` (``meta.parquet``) may be:

* ``<shard uri>#<key>`` (or ``::<key>``): sample ``key`` of a WebDataset tar / Parquet corpus
  shard (local path or ``s3://``). With the row's ``image_loc`` (recorded at index time,
  :mod:`sdray.data.locations`) only that image is read, by byte range:

  - a tar member: one ranged read of its 512-byte header and its data; the header's checksum,
    size and (when not truncated) name must agree with the location, else the shard changed
    since it was indexed (404);
  - a Parquet row: the footer (once per shard: an LRU of footers), then the image column and
    the key column (to check that the row still holds ``key``) of that one row group, through
    pyarrow reading a file whose every read is one range request (``cache_type="none"``).

  Without a location (an index built before locations were recorded, or a compressed tar) the
  shard is read whole, if it is no larger than the cap, and its images kept in a small LRU;
* a plain file URI (local path or ``s3://``) of an image file;
* a ``data:image/...;base64,`` URI.

**Bounded**: no read takes more than ``max_read_bytes`` (``ServeConfig.image_read_max_bytes``)
from storage for one image: a tar member, a Parquet row group's columns plus its footer, a plain
file or a location-less shard larger than that raises :class:`ReadTooLarge` before anything big
is read (the route then redirects to the document's source ``url``, or answers 404).

:func:`thumbnail` shrinks any of these to a JPEG of at most ``size`` pixels a side.

Storage reads are retried per :class:`~sdray.config.StorageConfig`; a missing object or sample is
``FileNotFoundError``/``KeyError`` (the endpoint's 404), a fault past the retries a
:class:`~sdray.storage.StorageError` (its 503).
"""

from __future__ import annotations

import base64
import io
import posixpath
import threading
from collections import OrderedDict

from PIL import Image

from sdray import storage
from sdray.data.decode import decode_image
from sdray.data.formats import IMAGE_COLUMNS, iter_shard_samples
from sdray.data.locations import ParquetRow, TarMember, parse_location
from sdray.data.skips import SkipCounts

DEFAULT_MAX_READ_BYTES = 16 * 1024 * 1024
BLOCK = 512             # tar header / block size
FOOTER_GUESS = 16 * 1024  # tail bytes read for a Parquet footer first (most fit)
_SHARD_CACHE: OrderedDict[str, dict[str, bytes]] = OrderedDict()
_SHARD_CACHE_MAX = 4
_FOOTERS: OrderedDict[str, object] = OrderedDict()     # Parquet shard -> its FileMetaData
_FOOTERS_MAX = 256
_LOCK = threading.Lock()


class ReadTooLarge(Exception):
    """The image cannot be read within the byte cap: ``what`` takes ``needed`` bytes > ``cap``;
    ``hint``: what would make it readable (for the client's error message)."""

    def __init__(self, uri: str, needed: int, cap: int, what: str, hint: str = ""):
        super().__init__(f"{uri}: {what} takes {needed} bytes, more than the cap of {cap}")
        self.needed, self.cap, self.what, self.hint = needed, cap, what, hint


class ShardChanged(KeyError):
    """The bytes at a recorded location are not the sample's: the shard changed since indexing."""


def split_uri(uri: str) -> tuple[str, str | None]:
    """``(file or shard uri, sample key or None)``."""
    for sep in ("::", "#"):
        if sep in uri and not uri.startswith("data:"):
            base, key = uri.rsplit(sep, 1)
            return base, key
    return uri, None


def _open_ranged(uri: str):
    """``uri`` opened for reading with no read-ahead: on object storage each ``read`` is exactly
    one range request (s3fs's default would fetch 50 MiB blocks)."""
    fs, path = storage.filesystem(uri)
    if storage.is_remote(uri):
        return fs.open(path, "rb", cache_type="none")
    return open(path, "rb")


def _size(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    if not storage.is_remote(uri):
        return fs.size(path)
    return storage.call_with_retries(lambda: fs.size(path), f"sizing {uri}")


# ------------------------------------------------------------------------------- tar members

def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    if text[:1] and text[0] & 0x80:  # GNU base-256 size
        return int.from_bytes(field[1:], "big")
    return int(text or b"0", 8)


def _check_header(header: bytes, key: str, loc: TarMember, uri: str) -> None:
    """``ShardChanged`` unless ``header`` is a valid tar header of a ``loc.size``-byte member of ``key``."""
    stored = header[148:156]
    checksum = sum(header[:148]) + 8 * 32 + sum(header[156:])
    try:
        ok = len(header) == BLOCK and _octal(stored) == checksum and _octal(header[124:136]) == loc.size
    except ValueError:
        ok = False
    name = header[:100].split(b"\0", 1)
    if ok and len(name) == 2:                   # a complete (not truncated) name: check its key
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        folder, base = posixpath.split(posixpath.join(prefix.decode("utf-8", "replace"),
                                                      name[0].decode("utf-8", "replace")))
        ok = posixpath.join(folder, base.split(".", 1)[0]) == key
    if not ok:
        raise ShardChanged(f"{uri}: no member of sample {key!r} at {loc}: the shard changed since it was indexed")


def _tar_member_at(uri: str, key: str, loc: TarMember, cap: int) -> bytes:
    """The member's data, read with its header in one range request."""
    if loc.size + BLOCK > cap:
        raise ReadTooLarge(uri, loc.size + BLOCK, cap, f"tar member of sample {key!r}")
    if loc.offset < BLOCK:
        raise ShardChanged(f"{uri}: {loc} cannot hold a tar member")

    def read() -> bytes:
        with _open_ranged(uri) as f:
            f.seek(loc.offset - BLOCK)
            return f.read(BLOCK + loc.size)

    data = storage.call_with_retries(read, f"reading sample {key!r} of {uri}")
    if len(data) != BLOCK + loc.size:
        raise ShardChanged(f"{uri}: ends before {loc}: the shard changed since it was indexed")
    _check_header(data[:BLOCK], key, loc, uri)
    return data[BLOCK:]


# ------------------------------------------------------------------------------ Parquet rows

def _read_tail(uri: str, n: int) -> tuple[int, bytes]:
    """``(file size, its last n bytes)``: one range request."""
    def read():
        with _open_ranged(uri) as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - n))
            return size, f.read(n)

    return storage.call_with_retries(read, f"reading the end of {uri}")


def _parquet_footer(uri: str, cap: int):
    """The file's metadata, from its footer alone (``FOOTER_GUESS`` bytes of tail, and one more
    read when the footer is longer), kept in a small LRU; ``ReadTooLarge`` for a footer over ``cap``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _LOCK:
        md = _FOOTERS.get(uri)
        if md is not None:
            _FOOTERS.move_to_end(uri)
            return md
    size, tail = _read_tail(uri, FOOTER_GUESS)
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise ValueError(f"{uri}: not a Parquet file (no footer)")
    length = int.from_bytes(tail[-8:-4], "little") + 8
    if length > cap:
        raise ReadTooLarge(uri, length, cap, "the Parquet footer")
    if length > len(tail):
        size, tail = _read_tail(uri, length)
    try:        # pyarrow parses a footer behind a magic number: the metadata, nothing else read
        md = pq.read_metadata(io.BytesIO(b"PAR1" + tail[-length:]))
    except pa.ArrowInvalid as err:
        raise ValueError(f"{uri}: unreadable Parquet footer ({err})") from None
    with _LOCK:
        _FOOTERS[uri] = md
        while len(_FOOTERS) > _FOOTERS_MAX:
            _FOOTERS.popitem(last=False)
    return md


def _parquet_row_at(uri: str, key: str, loc: ParquetRow, cap: int) -> bytes:
    """The image of row ``loc`` (footer + that row group's image and key columns only)."""
    import pyarrow.parquet as pq

    md = _parquet_footer(uri, cap)
    if loc.row_group >= md.num_row_groups or loc.row >= md.row_group(loc.row_group).num_rows:
        raise ShardChanged(f"{uri}: has no {loc}: the shard changed since it was indexed")
    names = md.schema.to_arrow_schema().names
    image_cols = [c for c in IMAGE_COLUMNS if c in names]
    key_col = next((c for c in ("sample_id", "key") if c in names), None)
    cols = image_cols + ([key_col] if key_col else [])
    group = md.row_group(loc.row_group)
    chunk = {group.column(i).path_in_schema: group.column(i).total_compressed_size for i in range(group.num_columns)}
    needed = md.serialized_size + 8 + sum(chunk.get(c, 0) for c in cols)
    if needed > cap:
        raise ReadTooLarge(uri, needed, cap, f"row group {loc.row_group} (image and key columns)")

    def rows():
        with _open_ranged(uri) as f:
            return pq.ParquetFile(f, metadata=md).read_row_group(loc.row_group, columns=cols)

    table = storage.call_with_retries(rows, f"reading sample {key!r} of {uri}")
    found = table.column(key_col)[loc.row].as_py() if key_col else None
    if found in (None, ""):         # the reader's default key: the row's number in the shard
        found = f"{sum(md.row_group(g).num_rows for g in range(loc.row_group)) + loc.row:09d}"
    if str(found) != key:
        raise ShardChanged(f"{uri}: {loc} holds sample {str(found)[:80]!r}, not {key!r}: the shard "
                           "changed since it was indexed")
    image = next((v for c in image_cols if (v := table.column(c)[loc.row].as_py()) is not None), None)
    if image is None:
        raise KeyError(f"sample {key!r} of {uri} has no image")
    return image.encode("latin-1") if isinstance(image, str) else bytes(image)


# ------------------------------------------------------------------ shards without locations

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


def _whole_shard_image(uri: str, key: str, cap: int) -> bytes:
    """Sample ``key`` of a shard read whole (an index without image locations), if ≤ ``cap``."""
    with _LOCK:
        cached = uri in _SHARD_CACHE
    if not cached and (size := _size(uri)) > cap:
        raise ReadTooLarge(uri, size, cap, "the whole shard",
                           "the index predates image locations; rebuilding it lets one image be read")
    images = _shard_images(uri)
    if key not in images:
        raise KeyError(f"sample {key!r} not found in {uri}")
    return images[key]


def _whole_file(uri: str, cap: int) -> bytes:
    if (size := _size(uri)) > cap:
        raise ReadTooLarge(uri, size, cap, "the image file")
    return storage.read_bytes(uri)


def read_image_bytes(uri: str, loc: str | None = None, max_read_bytes: int = DEFAULT_MAX_READ_BYTES) -> bytes:
    """The original image bytes behind ``uri`` (see module docstring); ``loc``: the index row's
    ``image_loc``.

    Raises ``KeyError`` / ``FileNotFoundError`` when the sample or object does not exist (or no
    longer sits where the index says), :class:`ReadTooLarge` when it cannot be read within
    ``max_read_bytes``, ``ValueError`` for a malformed location or a corrupt Parquet file, and
    :class:`~sdray.storage.StorageError` (an ``OSError``) when the store failed past its retries:
    a fault never looks like a missing image."""
    if uri.startswith("data:"):
        _, _, payload = uri.partition(",")
        return base64.b64decode(payload)
    base, key = split_uri(uri)
    if key is None:
        return _whole_file(base, max_read_bytes)
    where = parse_location(loc)
    parquet = base.endswith(".parquet")
    if where is None:
        return _whole_shard_image(base, key, max_read_bytes)
    if parquet and isinstance(where, ParquetRow):
        return _parquet_row_at(base, key, where, max_read_bytes)
    if not parquet and isinstance(where, TarMember):
        return _tar_member_at(base, key, where, max_read_bytes)
    raise ValueError(f"image location {where} does not fit shard {base}")


def thumbnail(data: bytes, size: int = 256, max_pixels: int = 40_000_000) -> bytes:
    """JPEG bytes of ``data`` shrunk to at most ``size`` a side; ValueError if undecodable."""
    im, reason = decode_image(data, max_pixels)
    if im is None:
        raise ValueError(f"stored image cannot be decoded ({reason})")
    im.thumbnail((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()
