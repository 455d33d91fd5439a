"""Shard parsing and decoding with per-reason skip counts (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from sdray.data import SkipCounts, decode_batch, decode_image, iter_shard_samples, shard_name
from sdray.data.formats import iter_tar_samples, tar_shard_bytes
from tests import data_fixtures as F


def _parse(data: bytes, uri: str):
    counts = SkipCounts()
    rows = list(iter_shard_samples(io.BytesIO(data), uri, counts))
    return rows, counts


def _decoded(rows, counts):
    batch = {k: np.asarray([r[k] for r in rows], dtype=object)
             for k in ("sample_id", "image_id", "caption", "image")}
    return decode_batch(batch, None, counts, max_pixels=40_000_000, image_size=16)


def test_corrupt_tar_counts_every_reason_and_keeps_every_valid_sample():
    rows, counts = _parse(F.mixed_tar(), "s3://b/x/bad-000.tar")
    out = _decoded(rows, counts)
    _, expected, valid = F.mixed_samples()
    assert counts.to_dict() == expected
    assert sorted(str(s) for s in out["sample_id"]) == sorted(f"bad-000/{k}" for k in valid)
    assert out["pixels"].shape == (len(valid), 3, 16, 16)
    caps = dict(zip(out["sample_id"], out["caption"]))
    assert caps["bad-000/g2"] == "a blue box"                        # stripped
    assert caps["bad-000/g3"] == "ünïcödé caption ✓"
    ids = dict(zip(out["sample_id"], out["image_id"]))
    assert ids["bad-000/g0"] == "img-a"                             # from KEY.json
    assert len(ids["bad-000/g1"]) == 40                              # sha1 of the bytes
    assert counts.samples_skipped == 8


def test_parquet_shard():
    data, expected, valid = F.mixed_parquet()
    rows, counts = _parse(data, "/d/part-1.parquet")
    out = _decoded(rows, counts)
    assert counts.to_dict() == expected
    assert sorted(out["sample_id"]) == [f"part-1/{k}" for k in valid]
    assert dict(zip(out["sample_id"], out["image_id"]))["part-1/p0"] == "pid-0"


def test_img2dataset_layout():
    rows, counts = _parse(F.img2dataset_tar(5), "/d/00000.tar")
    assert not counts and len(rows) == 5
    assert rows[0]["sample_id"] == "00000/000000000"
    assert rows[3]["caption"] == "web caption number 3"


def test_unreadable_and_truncated_shards():
    rows, counts = _parse(b"\x00garbage" * 100, "/d/x.tar")
    assert rows == [] and counts.to_dict() == {"shard_unreadable": 1}
    rows, counts = _parse(b"", "/d/empty.tar")
    assert rows == [] and counts.to_dict() == {"shard_unreadable": 1}
    rows, counts = _parse(b"not parquet", "/d/x.parquet")
    assert rows == [] and counts.to_dict() == {"shard_unreadable": 1}
    whole = F.img2dataset_tar(6)
    import tarfile

    cut = tarfile.open(fileobj=io.BytesIO(whole)).getmembers()[10].offset_data + 5  # mid-member
    rows, counts = _parse(whole[:cut], "/d/cut.tar")
    assert counts["shard_truncated"] == 1
    assert len(rows) == 3              # the complete samples before the cut survive
    assert all(r["caption"].startswith("web caption") for r in rows)


def test_members_grouped_by_key_even_when_not_adjacent():
    a = F.img2dataset_tar(2)
    import tarfile

    src = tarfile.open(fileobj=io.BytesIO(a))
    members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for m, d in sorted(members, key=lambda x: x[0].name.split(".")[1]):   # all .jpg first
            tf.addfile(m, io.BytesIO(d))
    counts = SkipCounts()
    rows = list(iter_tar_samples(io.BytesIO(buf.getvalue()), "s", counts))
    assert len(rows) == 2 and not counts


def test_decode_image_reasons():
    assert decode_image(F.bomb_png(), 40_000_000)[1] == "image_too_large"
    assert decode_image(F.truncated_jpeg(), 40_000_000)[1] == "image_truncated"
    assert decode_image(b"GIF89a....", 40_000_000)[1] == "image_undecodable"
    assert decode_image(F.png(size=(100, 100)), 9_999)[1] == "image_too_large"
    im, reason = decode_image(F.png(mode="RGBA", colour=(0, 0, 0, 0)), 1000)
    assert reason is None and im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)


def test_caption_too_long():
    counts = SkipCounts()
    data = tar_shard_bytes([{"key": "k", "image": F.jpeg(), "caption": "x" * 100}])
    assert list(iter_tar_samples(io.BytesIO(data), "s", counts, max_caption_bytes=50)) == []
    assert counts.to_dict() == {"caption_too_long": 1}


def test_decode_with_a_preprocessor_gives_model_inputs():
    class Pre:
        image_size = 8

        def images(self, ims):
            return np.ones((len(ims), 3, 8, 8), np.float32)

        def texts(self, caps):
            return {"input_ids": np.ones((len(caps), 4), np.int64),
                    "attention_mask": np.ones((len(caps), 4), np.int64)}

    rows, counts = _parse(F.mixed_tar(), "bad.tar")
    batch = {k: np.asarray([r[k] for r in rows], dtype=object)
             for k in ("sample_id", "image_id", "caption", "image")}
    out = decode_batch(batch, Pre(), counts, 40_000_000)
    assert out["pixels"].shape == (5, 3, 8, 8) and out["input_ids"].shape == (5, 4)


def test_shard_name():
    assert shard_name("s3://b/x/00012.tar") == "00012"
    assert shard_name("/a/b/part.parquet") == "part"
