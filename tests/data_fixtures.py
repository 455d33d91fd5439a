"""Builders of deliberately corrupt image–text shards, shared by the data tests."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

from sdray.data.formats import parquet_shard_bytes, tar_shard_bytes


def jpeg(colour=(200, 30, 30), size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(colour=(30, 200, 30), size=(16, 16), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def webp(colour=(30, 30, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="WEBP")
    return buf.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny PNG whose header claims ``width``×``height`` pixels (a decompression bomb)."""
    raw = bytearray(png(size=(1, 1)))
    # IHDR data starts at byte 16: width, height (big-endian), then the CRC over type+data
    raw[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF
    raw[29:33] = struct.pack(">I", crc)
    return bytes(raw)


def truncated_jpeg() -> bytes:
    data = jpeg(size=(64, 64))
    return data[: len(data) // 2]


GOOD = "good"


def mixed_samples() -> tuple[list[dict], dict[str, int], list[str]]:
    """Samples for one tar: (samples, expected skip counts, keys of the valid samples)."""
    s = [
        {"key": "g0", "image": jpeg(), "ext": "jpg", "caption": "a red box", "meta": {"image_id": "img-a"}},
        {"key": "g1", "image": png(), "ext": "png", "caption": "a green box"},
        {"key": "g2", "image": webp(), "ext": "webp", "caption": "  a blue box\n"},
        {"key": "g3", "image": png(mode="RGBA", colour=(1, 2, 3, 100)), "ext": "png",
         "caption": "ünïcödé caption ✓", "extra": {"foo": b"stray"}},         # + 1 stray member
        {"key": "g4", "image": jpeg(), "ext": "jpeg", "caption": "bad json kept", "meta": b"{not json"},
        {"key": "b_trunc", "image": truncated_jpeg(), "ext": "jpg", "caption": "truncated"},
        {"key": "b_garbage", "image": b"this is not an image", "ext": "jpg", "caption": "garbage"},
        {"key": "b_bomb", "image": bomb_png(), "ext": "png", "caption": "bomb"},
        {"key": "b_nocap", "image": jpeg(), "ext": "jpg"},
        {"key": "b_empty", "image": jpeg(), "ext": "jpg", "caption": "   "},
        {"key": "b_utf8", "image": jpeg(), "ext": "jpg", "caption": b"\xff\xfe\xfa bad"},
        {"key": "b_noimg", "caption": "caption without image"},
        {"key": "b_emptyimg", "image": b"", "ext": "jpg", "caption": "empty image"},
    ]
    s.append({"key": "README", "extra": {"": b"a member without extension"}})       # stray
    expected = {"image_truncated": 1, "image_undecodable": 1, "image_too_large": 1,
                "caption_missing": 1, "caption_empty": 1, "caption_not_utf8": 1,
                "image_missing": 1, "image_empty": 1, "stray_member": 2, "bad_metadata": 1}
    valid = ["g0", "g1", "g2", "g3", "g4"]
    return s, expected, valid


def mixed_tar() -> bytes:
    return tar_shard_bytes(mixed_samples()[0])


def mixed_parquet() -> tuple[bytes, dict[str, int], list[str]]:
    rows = [
        {"key": "p0", "image": jpeg(), "caption": "parquet one", "image_id": "pid-0"},
        {"key": "p1", "image": png(), "caption": "parquet two"},
        {"key": "p_none", "image": None, "caption": "no image"},
        {"key": "p_trunc", "image": truncated_jpeg(), "caption": "truncated"},
        {"key": "p_nocap", "image": jpeg(), "caption": None},
        {"key": "p_empty", "image": jpeg(), "caption": ""},
    ]
    expected = {"image_missing": 1, "image_truncated": 1, "caption_missing": 1, "caption_empty": 1}
    return parquet_shard_bytes(rows), expected, ["p0", "p1"]


def img2dataset_tar(n=4, start=0) -> bytes:
    """img2dataset's own layout: 9-digit keys, .jpg/.txt/.json with its metadata fields."""
    samples = []
    for i in range(start, start + n):
        key = f"{i:09d}"
        samples.append({"key": key, "image": jpeg(colour=(10 * i % 255, 80, 120)), "ext": "jpg",
                        "caption": f"web caption number {i}",
                        "meta": {"url": f"http://example.com/{i}.jpg", "key": key,
                                 "status": "success", "error_message": None, "width": 24,
                                 "height": 20, "caption": f"web caption number {i}",
                                 "original_width": 240, "original_height": 200}})
    return tar_shard_bytes(samples)


def saved_sweep_run(runs: str, names: tuple[str, ...] = ("joint-x",)) -> None:
    """A sweep results file at ``runs`` as ``benchmarks/sweep.py`` writes it: one row per name
    (3 epochs, seed 1, val-chosen w2 0.5 / z-score 0.2) and, for ``joint-x``, its saved random
    heads (24-d text and 20-d image features, 16-d projections, a 300-term vocabulary)."""
    import json

    import torch
    from safetensors.torch import save_file

    from sdray.heads import RetrieverHeads

    torch.manual_seed(0)
    heads = RetrieverHeads(torch.nn.Linear(24, 16), torch.nn.Linear(20, 16), torch.randn(300, 16), tau_init=0.05)
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, f"{runs}.joint-x.e3.s1.safetensors")
    row = {"epochs": 3, "seed": 1, "test": {"val_w2": 0.5, "val_w2_zscore": 0.2}}
    with open(runs, "w") as f:
        f.write("".join(json.dumps({"name": name, **row}) + "\n" for name in names))


def repeated_feature_split(rng, n_images: int, n_captions: int, n: int) -> dict:
    """``n`` random feature pairs over ``n_images`` images and ``n_captions`` captions (pair i:
    image i mod n_images, caption i mod n_captions; one feature vector per image and per caption),
    so some images have several captions and some captions several images."""
    import numpy as np

    data = {"image_id": [f"img{i % n_images}" for i in range(n)],
            "caption": [f"caption {i % n_captions}" for i in range(n)],
            "text_features": rng.standard_normal((n, 24)).astype(np.float32),
            "image_features": rng.standard_normal((n, 20)).astype(np.float32)}
    for i in range(n):
        data["image_features"][i] = data["image_features"][i % n_images]
        data["text_features"][i] = data["text_features"][i % n_captions]
    return data
