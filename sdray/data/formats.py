"""Image–text shard formats: WebDataset tar (img2dataset layout) and Parquet.

Pure Python (no Ray). A *raw sample* is a dict::

    {"sample_id": str, "image_id": str, "caption": str, "image": bytes, "key": str,
     "url": str | None, "image_loc": str | None}

``sample_id`` is ``<shard id>/<key>``, where the shard id is the shard's path relative to the
input root without its suffix (:func:`shard_id`: ``train/shard-00000``), so ids are unique across
the whole input however the folders nest. ``image_id`` comes from ``KEY.json``/the ``image_id``
column or defaults to the SHA-1 of the image bytes; ``url`` is img2dataset's source URL, if any;
``image_loc`` where the image bytes sit in the shard (:mod:`sdray.data.locations`).
Parsers never raise on bad input: they count it in a :class:`SkipCounts` and go on. They parse
bytes already read in full (``storage.read_shard_bytes``), so a parse error is bad data, never a
storage fault.

Both output formats of img2dataset are read: ``webdataset`` (``NNNNN.tar``, with a metadata
``NNNNN.parquet`` and ``NNNNN_stats.json`` beside it: sidecars, see :func:`is_sidecar`) and
``parquet`` (image bytes in a ``jpg``/``png``/``webp`` column, ``caption``, ``key``, ``url``,
``status``; rows whose download failed are counted as ``download_failed``).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import io
import json
import posixpath
import tarfile
from typing import IO, Any, Iterable, Iterator

from sdray.data import skips as S
from sdray.data.locations import ParquetRow, TarMember
from sdray.data.skips import SkipCounts

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt",)
META_EXTS = ("json",)
KNOWN_EXTS = IMAGE_EXTS + TEXT_EXTS + META_EXTS
SHARD_SUFFIXES = (".tar", ".parquet")
# Image columns of a Parquet shard, in order of preference (``image``; img2dataset's encode format).
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
STATS_SUFFIX = "_stats.json"     # img2dataset's per-shard download statistics


def _strip_suffix(path: str) -> str:
    for suf in SHARD_SUFFIXES:
        if path.endswith(suf):
            return path[: -len(suf)]
    return path


def shard_name(uri: str) -> str:
    """``s3://b/x/00012.tar`` -> ``00012`` (the base name; not unique across folders)."""
    return _strip_suffix(posixpath.basename(str(uri).rstrip("/")))


def shard_id(uri: str, root: str | None = None) -> str:
    """The shard's path under ``root`` without its suffix: ``ROOT/train/shard-00000.tar`` ->
    ``train/shard-00000``; the base name when ``root`` is ``None`` or the shard itself."""
    uri, base = str(uri).rstrip("/"), str(root or "").rstrip("/")
    if not base or uri == base or not uri.startswith(base + "/"):
        return shard_name(uri)
    return _strip_suffix(uri[len(base) + 1:])


def is_sidecar(uri: str, siblings: set[str]) -> bool:
    """True for img2dataset's metadata ``NNNNN.parquet`` written beside ``NNNNN.tar``
    (``siblings``: the other shard URIs listed with it)."""
    return str(uri).endswith(".parquet") and _strip_suffix(str(uri)) + ".tar" in siblings


def stats_uri(uri: str) -> str:
    """Where img2dataset writes the download statistics of shard ``uri`` (``NNNNN_stats.json``)."""
    return _strip_suffix(str(uri)) + STATS_SUFFIX


def image_hash(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def check_caption(raw: Any, max_bytes: int, counts: SkipCounts) -> str | None:
    """The caption as text, or ``None`` (counted) if missing, not UTF-8, empty or too long."""
    if raw is None:
        counts.add(S.CAPTION_MISSING)
        return None
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        if len(raw) > max_bytes:
            counts.add(S.CAPTION_TOO_LONG)
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            counts.add(S.CAPTION_NOT_UTF8)
            return None
    else:
        text = str(raw)
        if len(text.encode("utf-8", "surrogatepass")) > max_bytes:
            counts.add(S.CAPTION_TOO_LONG)
            return None
    text = text.lstrip("\ufeff").strip()
    if not text:
        counts.add(S.CAPTION_EMPTY)
        return None
    return text


def _split_member(name: str) -> tuple[str, str] | None:
    """WebDataset convention: key = path up to the first dot of the basename, ext = the rest."""
    dirname, base = posixpath.split(name)
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    if not stem:
        return None
    return posixpath.join(dirname, stem), ext.lower()


def _finish(shard: str, key: str, fields: dict[str, bytes], max_caption_bytes: int,
            counts: SkipCounts, where: dict[str, TarMember]) -> dict | None:
    image, loc = None, None
    for ext in IMAGE_EXTS:
        if ext in fields:
            image, loc = fields[ext], where.get(ext)
            break
    meta: dict = {}
    if "json" in fields:
        try:
            meta = json.loads(fields["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except Exception:
            counts.add(S.BAD_METADATA)
            meta = {}
    raw_caption = fields.get("txt")
    if raw_caption is None and isinstance(meta.get("caption"), str):
        raw_caption = meta["caption"]
    return _sample(shard, key, image, raw_caption, meta.get("image_id"), meta.get("url"),
                   max_caption_bytes, counts, loc)


def iter_tar_samples(fileobj: IO[bytes], shard: str, counts: SkipCounts,
                     max_caption_bytes: int = 4096) -> Iterator[dict]:
    """Raw samples from a WebDataset tar stream; bad members and samples are counted.

    Members of one sample are grouped by key (they need not be adjacent). A tar that ends
    early keeps every complete sample before the break (``shard_truncated``); one that cannot
    be opened at all counts ``shard_unreadable``. Each sample's ``image_loc`` is its image
    member's byte range in the tar (:class:`~sdray.data.locations.TarMember`; ``None`` for a
    compressed tar, whose offsets are not file offsets).
    """
    groups: dict[str, dict[str, bytes]] = {}
    where: dict[str, dict[str, TarMember]] = {}
    order: list[str] = []
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r|*")
    except Exception:
        counts.add(S.SHARD_UNREADABLE)
        return
    broken = False
    last_key: str | None = None
    plain = getattr(tf.fileobj, "comptype", None) == "tar"     # stream mode: the decompressor's kind
    try:
        for member in tf:
            if not member.isfile():
                continue
            split = _split_member(member.name)
            if split is None or split[1] not in KNOWN_EXTS:
                counts.add(S.STRAY_MEMBER)
                continue
            key, ext = split
            last_key = key
            f = tf.extractfile(member)
            data = f.read() if f is not None else b""
            if len(data) != member.size:
                broken = True
                break
            last_key = None
            if key not in groups:
                groups[key] = {}
                order.append(key)
            if ext in groups[key]:
                counts.add(S.DUPLICATE_KEY)
                continue
            groups[key][ext] = data
            if plain and ext in IMAGE_EXTS:
                where.setdefault(key, {})[ext] = TarMember(member.offset_data, member.size)
    except Exception:
        broken = True
    finally:
        with contextlib.suppress(tarfile.TarError, OSError):
            tf.close()
    if broken:
        if not order:
            counts.add(S.SHARD_UNREADABLE)
            return
        counts.add(S.SHARD_TRUNCATED)
        if last_key in groups:          # the sample cut by the break is incomplete: not counted
            del groups[last_key]
            order.remove(last_key)
    for key in order:
        sample = _finish(shard, key, groups[key], max_caption_bytes, counts, where.get(key, {}))
        if sample is not None:
            yield sample


def iter_parquet_samples(fileobj: IO[bytes], shard: str, counts: SkipCounts,
                         max_caption_bytes: int = 4096) -> Iterator[dict]:
    """Raw samples from a Parquet shard: an image column (``image``, or img2dataset's ``jpg``/
    ``png``/``webp``) and ``caption``; optional ``key``/``sample_id``, ``image_id``, ``url`` and
    img2dataset's ``status`` (a row that is not ``success`` counts as ``download_failed``).
    Each sample's ``image_loc`` is its row group and row (:class:`~sdray.data.locations.ParquetRow`)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(fileobj)
        names = set(pf.schema_arrow.names)
    except Exception:  # the bytes were read in full: not a Parquet file
        counts.add(S.SHARD_UNREADABLE)
        return
    image_cols = [c for c in IMAGE_COLUMNS if c in names]
    if not image_cols or "caption" not in names:
        counts.add(S.SHARD_UNREADABLE)
        return
    optional = ("image_id", "key", "sample_id", "url", "status")
    cols = image_cols + ["caption"] + [c for c in optional if c in names]
    row = 0
    try:
        groups = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        starts = list(itertools.accumulate(groups, initial=0))
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            data = batch.to_pydict()
            nothing = [None] * batch.num_rows
            for i in range(batch.num_rows):
                key = data.get("sample_id", data.get("key", nothing))[i]
                key = str(key) if key not in (None, "") else f"{row:09d}"
                group = bisect.bisect_right(starts, row) - 1
                loc = ParquetRow(group, row - starts[group])
                row += 1
                image = next((data[c][i] for c in image_cols if data[c][i] is not None), None)
                status = data.get("status", nothing)[i]
                if status not in (None, "success"):
                    counts.add(S.DOWNLOAD_FAILED)
                    continue
                sample = _sample(shard, key, image, data["caption"][i],
                                         data.get("image_id", nothing)[i],
                                         data.get("url", nothing)[i], max_caption_bytes, counts, loc)
                if sample is not None:
                    yield sample
    except Exception:  # a corrupt row group in bytes read in full
        counts.add(S.SHARD_TRUNCATED if row else S.SHARD_UNREADABLE)


def _sample(shard: str, key: str, image: Any, raw_caption: Any, image_id: Any, url: Any,
            max_caption_bytes: int, counts: SkipCounts,
            loc: TarMember | ParquetRow | None = None) -> dict | None:
    """One raw sample (tar or Parquet), or ``None`` with the reason counted: no or empty image,
    bad caption. ``image_id`` defaults to the hash of the image bytes."""
    if image is None:
        counts.add(S.IMAGE_MISSING)
        return None
    if isinstance(image, str):
        image = image.encode("latin-1")
    if len(image) == 0:
        counts.add(S.IMAGE_EMPTY)
        return None
    caption = check_caption(raw_caption, max_caption_bytes, counts)
    if caption is None:
        return None
    image = bytes(image)
    iid = str(image_id) if image_id not in (None, "") else image_hash(image)
    return {"sample_id": f"{shard}/{key}", "image_id": iid, "caption": caption, "image": image,
            "key": key, "url": str(url) if url not in (None, "") else None,
            "image_loc": None if loc is None else str(loc)}


def iter_shard_samples(fileobj: IO[bytes], uri: str, counts: SkipCounts,
                       max_caption_bytes: int = 4096, shard: str | None = None) -> Iterator[dict]:
    """Dispatch on the shard's suffix (``.parquet`` -> Parquet, anything else -> tar).

    ``shard``: the id that prefixes sample ids (:func:`shard_id`); default the base name.
    """
    name = shard if shard is not None else shard_name(uri)
    if str(uri).endswith(".parquet"):
        return iter_parquet_samples(fileobj, name, counts, max_caption_bytes)
    return iter_tar_samples(fileobj, name, counts, max_caption_bytes)


# ----------------------------------------------------------------------------- writing

def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0          # deterministic bytes
    info.mode = 0o644
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def write_tar_shard(fileobj: IO[bytes], samples: Iterable[dict]) -> int:
    """Write samples ``{"key", "image": bytes, "ext": "jpg", "caption": str|bytes, "meta": dict}``
    as a WebDataset tar (img2dataset layout: ``KEY.jpg``, ``KEY.txt``, ``KEY.json``).

    Missing fields are simply not written (tests use that to build bad shards); ``extra`` maps
    member suffixes to raw bytes for deliberately stray members. Returns the sample count.
    """
    n = 0
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            key = s["key"]
            if s.get("image") is not None:
                _add_member(tf, f"{key}.{s.get('ext', 'jpg')}", s["image"])
            cap = s.get("caption")
            if cap is not None:
                _add_member(tf, f"{key}.txt", cap.encode("utf-8") if isinstance(cap, str) else cap)
            if s.get("meta") is not None:
                meta = s["meta"]
                raw = meta if isinstance(meta, bytes) else json.dumps(meta, sort_keys=True).encode()
                _add_member(tf, f"{key}.json", raw)
            for suffix, data in (s.get("extra") or {}).items():
                _add_member(tf, f"{key}.{suffix}" if suffix else key, data)
            n += 1
    return n


def tar_shard_bytes(samples: Iterable[dict]) -> bytes:
    buf = io.BytesIO()
    write_tar_shard(buf, samples)
    return buf.getvalue()


def parquet_shard_bytes(samples: Iterable[dict], row_group_size: int | None = None) -> bytes:
    """Samples ``{"key", "image", "caption", "image_id"?, "url"?}`` as a Parquet image–text shard
    (rows per row group: ``row_group_size``, default pyarrow's). No min/max statistics for the
    image column: they would copy two images per row group into the footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(samples)
    table = pa.table({
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "image": pa.array([r.get("image") for r in rows], pa.binary()),
        "caption": pa.array([r.get("caption") for r in rows], pa.string()),
        "image_id": pa.array([r.get("image_id") for r in rows], pa.string()),
        "url": pa.array([r.get("url") for r in rows], pa.string()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size,
                   write_statistics=[c for c in table.column_names if c != "image"])
    return buf.getvalue()
