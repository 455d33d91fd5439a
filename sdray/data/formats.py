"""Image–text shard formats: WebDataset tar (img2dataset layout) and Parquet.

Pure Python (no Ray). A *raw sample* is a dict::

    {"sample_id": str, "image_id": str, "caption": str, "image": bytes}

``sample_id`` is ``<shard name>/<key>`` (unique across a split), ``image_id`` comes from
``KEY.json``/the ``image_id`` column or defaults to the SHA-1 of the image bytes.
Parsers never raise on bad input: they count it in a :class:`SkipCounts` and go on.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from typing import IO, Any, Iterable, Iterator

from sdray.data import skips as S
from sdray.data.skips import SkipCounts

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt",)
META_EXTS = ("json",)
KNOWN_EXTS = IMAGE_EXTS + TEXT_EXTS + META_EXTS
# Sidecar files img2dataset writes next to its tars; they are not shards.
SHARD_SUFFIXES = (".tar", ".parquet")


def shard_name(uri: str) -> str:
    """``s3://b/x/00012.tar`` -> ``00012``."""
    base = posixpath.basename(str(uri).rstrip("/"))
    for suf in SHARD_SUFFIXES:
        if base.endswith(suf):
            return base[: -len(suf)]
    return base


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
            counts: SkipCounts) -> dict | None:
    image = None
    for ext in IMAGE_EXTS:
        if ext in fields:
            image = fields[ext]
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
    if image is None:
        counts.add(S.IMAGE_MISSING)
        return None
    if len(image) == 0:
        counts.add(S.IMAGE_EMPTY)
        return None
    caption = check_caption(raw_caption, max_caption_bytes, counts)
    if caption is None:
        return None
    image_id = meta.get("image_id")
    image_id = str(image_id) if image_id not in (None, "") else image_hash(image)
    return {"sample_id": f"{shard}/{key}", "image_id": image_id, "caption": caption,
            "image": image}


def iter_tar_samples(fileobj: IO[bytes], shard: str, counts: SkipCounts,
                     max_caption_bytes: int = 4096) -> Iterator[dict]:
    """Raw samples from a WebDataset tar stream; bad members and samples are counted.

    Members of one sample are grouped by key (they need not be adjacent). A tar that ends
    early keeps every complete sample before the break (``shard_truncated``); one that cannot
    be opened at all counts ``shard_unreadable``.
    """
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r|*")
    except Exception:
        counts.add(S.SHARD_UNREADABLE)
        return
    broken = False
    last_key: str | None = None
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
    except Exception:
        broken = True
    finally:
        try:
            tf.close()
        except Exception:
            pass
    if broken:
        if not order:
            counts.add(S.SHARD_UNREADABLE)
            return
        counts.add(S.SHARD_TRUNCATED)
        if last_key in groups:          # the sample cut by the break is incomplete: not counted
            del groups[last_key]
            order.remove(last_key)
    for key in order:
        sample = _finish(shard, key, groups[key], max_caption_bytes, counts)
        if sample is not None:
            yield sample


def iter_parquet_samples(fileobj: IO[bytes], shard: str, counts: SkipCounts,
                         max_caption_bytes: int = 4096) -> Iterator[dict]:
    """Raw samples from a Parquet shard with columns ``image`` (bytes) and ``caption``."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(fileobj)
        names = set(pf.schema_arrow.names)
    except Exception:
        counts.add(S.SHARD_UNREADABLE)
        return
    if "image" not in names or "caption" not in names:
        counts.add(S.SHARD_UNREADABLE)
        return
    cols = [c for c in ("image", "caption", "image_id", "key", "sample_id") if c in names]
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                key = data.get("sample_id", data.get("key", [None] * batch.num_rows))[i]
                key = str(key) if key not in (None, "") else f"{row:09d}"
                row += 1
                image = data["image"][i]
                if image is None:
                    counts.add(S.IMAGE_MISSING)
                    continue
                if isinstance(image, str):
                    image = image.encode("latin-1")
                if len(image) == 0:
                    counts.add(S.IMAGE_EMPTY)
                    continue
                caption = check_caption(data["caption"][i], max_caption_bytes, counts)
                if caption is None:
                    continue
                iid = data.get("image_id", [None] * batch.num_rows)[i]
                iid = str(iid) if iid not in (None, "") else image_hash(image)
                yield {"sample_id": f"{shard}/{key}", "image_id": iid, "caption": caption,
                       "image": bytes(image)}
    except Exception:
        counts.add(S.SHARD_TRUNCATED if row else S.SHARD_UNREADABLE)


def iter_shard_samples(fileobj: IO[bytes], uri: str, counts: SkipCounts,
                       max_caption_bytes: int = 4096) -> Iterator[dict]:
    """Dispatch on the shard's suffix (``.parquet`` -> Parquet, anything else -> tar)."""
    name = shard_name(uri)
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


def parquet_shard_bytes(samples: Iterable[dict]) -> bytes:
    """Samples ``{"key", "image", "caption", "image_id"?}`` as a Parquet image–text shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(samples)
    table = pa.table({
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "image": pa.array([r.get("image") for r in rows], pa.binary()),
        "caption": pa.array([r.get("caption") for r in rows], pa.string()),
        "image_id": pa.array([r.get("image_id") for r in rows], pa.string()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
