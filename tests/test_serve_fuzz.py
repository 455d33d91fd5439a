"""Fuzzing ``serve.request.parse_request`` with seeded random and hostile bodies: every body is
either a valid query or a 4xx :class:`ApiError` whose JSON body is serialisable — never another
exception (which the app would turn into a 500)."""

import base64
import io
import json
import random

import pytest
from PIL import Image

from serve.config import ServeConfig
from serve.request import ApiError, Query, parse_request

CFG = ServeConfig(index="/nonexistent", k_max=50, max_image_bytes=200_000, max_image_pixels=1_000_000)
FIELDS = ["text", "image", "k", "mode", "fusion", "explain", "allow_partial", "extra"]
FUSION_FIELDS = ["method", "w1", "w2", "rrf_k", "tau"]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


def scalar(rng: random.Random):
    pick = rng.randrange(12)
    if pick == 0:
        return rng.choice([None, True, False])
    if pick == 1:
        return rng.randint(-10**6, 10**6)
    if pick == 2:
        return int("9" * rng.choice([19, 20, 300, 4000]))
    if pick == 3:
        return rng.choice([0.5, -1e308, 1e-320, 3.0, 51.0])
    if pick == 4:
        return "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(0, 20)))
    if pick == 5:
        return rng.choice(["hybrid", "dense", "sparse", "rrf", "raw", "calibrated", "", " ", "\x00"])
    if pick == 6:
        return base64.b64encode(PNG).decode()
    if pick == 7:
        return "data:image/png;base64," + base64.b64encode(rng.randbytes(rng.randrange(0, 64))).decode()
    if pick == 8:
        return "a red circle"
    if pick == 9:
        return rng.choice(["=", "@@@", "data:", "data:,x", "A" * 7])
    if pick == 10:
        return rng.randint(0, 60)
    return "x" * rng.choice([0, 999, 1001])


def value(rng: random.Random, depth: int = 0):
    pick = rng.randrange(10)
    if depth < 4 and pick == 0:
        return [value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if depth < 4 and pick == 1:
        return {rng.choice(FIELDS + FUSION_FIELDS): value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
    if depth < 4 and pick == 2:
        return {f: scalar(rng) for f in rng.sample(FUSION_FIELDS, rng.randrange(0, 4))}
    return scalar(rng)


def json_body(rng: random.Random) -> bytes:
    obj = {f: value(rng) for f in rng.sample(FIELDS, rng.randrange(0, 5))}
    if rng.random() < 0.5:
        obj["text" if rng.random() < 0.7 else "image"] = scalar(rng)
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    mutate = rng.randrange(8)
    if mutate == 0 and text:
        cut = rng.randrange(len(text))
        text = text[:cut]
    elif mutate == 1 and text:
        pos = rng.randrange(len(text))
        text = text[:pos] + rng.choice('{}[]",:\\0-e.') + text[pos:]
    elif mutate == 2:
        text = text.replace("9999", "NaN", 1).replace("0.5", "Infinity", 1)
    data = text.encode("utf-8", "surrogatepass")
    if mutate == 3:
        data = rng.randbytes(rng.randrange(0, 64))
    return data


def hostile(rng: random.Random) -> bytes:
    depth = rng.choice([500, 5_000, 100_000])
    kind = rng.randrange(6)
    if kind == 0:
        return b"[" * depth + b"]" * depth
    if kind == 1:
        return b'{"text": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
    if kind == 2:
        return b'{"text": "a", "k": ' + b"7" * rng.choice([4_300, 5_000, 50_000]) + b"}"
    if kind == 3:
        return b'{"text": "a", "fusion": {"w1": 1' + b"0" * 5_000 + b"}}"
    if kind == 4:
        return b'{"text": "a", "fusion": ' + b"[" * depth + b"]" * depth + b"}"
    return b'{"text": "\\ud800", "k": -0, "mode": "\\u0000"}'


def multipart(rng: random.Random) -> tuple[bytes, str]:
    boundary = rng.choice(["b0undary", "x", "--", "a" * 70])
    parts = []
    for name in rng.sample(FIELDS + ["fusion.w1", "fusion.method", "image"], rng.randrange(0, 5)):
        if name == "image" and rng.random() < 0.5:
            payload = PNG if rng.random() < 0.5 else rng.randbytes(rng.randrange(0, 40))
            head = f'Content-Disposition: form-data; name="image"; filename="q.png"'
        else:
            payload = (str(scalar(rng)) if rng.random() < 0.8 else
                       "[" * 3000 + "]" * 3000).encode("utf-8", "surrogatepass")
            head = f'Content-Disposition: form-data; name="{name}"'
        parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + payload + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    if rng.random() < 0.2:
        body = body[: rng.randrange(len(body) + 1)]
    ctype = rng.choice([f"multipart/form-data; boundary={boundary}", "multipart/form-data",
                        f"multipart/form-data; boundary=\"{boundary}\"; charset=x"])
    return body, ctype


def check(body: bytes, ctype: str | None):
    try:
        q = parse_request(body, ctype, CFG)
    except ApiError as err:
        assert 400 <= err.status < 500, (err.status, err.message)
        json.dumps({"error": err.message})
        return "error"
    assert isinstance(q, Query) and (q.text is None) != (q.image is None)
    assert 1 <= q.k <= CFG.k_max
    return "ok"


@pytest.mark.parametrize("seed", range(4))
def test_random_json_bodies_are_queries_or_4xx(seed):
    rng = random.Random(seed)
    outcomes = [check(json_body(rng), rng.choice(["application/json", None, "text/json; charset=utf-8"]))
                for _ in range(1500)]
    assert "error" in outcomes and "ok" in outcomes  # the generator reaches both sides


def test_hostile_bodies_are_4xx():
    rng = random.Random(7)
    for _ in range(60):
        assert check(hostile(rng), "application/json") == "error"


def test_random_multipart_bodies_are_queries_or_4xx():
    rng = random.Random(11)
    outcomes = [check(*multipart(rng)) for _ in range(1500)]
    assert "error" in outcomes and "ok" in outcomes


def test_random_content_types_and_bytes_are_4xx_or_queries():
    rng = random.Random(3)
    for _ in range(500):
        ctype = rng.choice(["application/xml", "", "application/json;", "multipart/form-data; boundary=",
                            "\x00", "APPLICATION/JSON", "image/png"])
        check(rng.randbytes(rng.randrange(0, 100)), ctype)
