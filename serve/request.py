"""Turn an HTTP request body into a validated :class:`Query`, or an :class:`ApiError` (4xx).

Pure Python (no Ray, no FastAPI), so every rule is unit-tested directly. Accepted bodies:

* ``application/json``: a :class:`~serve.schemas.SearchRequest` object.
* ``multipart/form-data``: the same fields as form fields; ``image`` may be a file upload;
  ``fusion`` (if any) is a JSON object in a field, or ``fusion.method``/``fusion.w1``... fields.

Every failure names what is wrong: bad JSON, wrong types, empty text, both or neither of
text/image, ``k`` out of range, unknown mode or fusion, undecodable or oversized image.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import json
from dataclasses import dataclass, field

from pydantic import ValidationError

from serve.config import ServeConfig
from serve.schemas import FUSIONS, MODES, FusionParams, SearchRequest


class ApiError(Exception):
    """A client error: HTTP ``status`` and a message for the ``{"error": ...}`` body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Query:
    """A validated search: exactly one of ``text`` / ``image`` (raw image file bytes)."""

    text: str | None
    image: bytes | None
    k: int
    mode: str
    fusion: FusionParams = field(default_factory=FusionParams)
    explain: int = 8
    allow_partial: bool = False

    @property
    def direction(self) -> str:
        return "t2i" if self.text is not None else "i2t"


def describe_validation_error(err: ValidationError) -> str:
    """Pydantic errors as one line: ``k: Input should be a valid integer; text: ...``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        got = e.get("input")
        if e.get("type") in ("int_type", "string_type", "float_type", "model_type", "dict_type",
                             "int_parsing", "float_parsing", "bool_type"):
            msg += f" (got {type(got).__name__})"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_json(body: bytes) -> SearchRequest:
    if not body.strip():
        raise ApiError(400, "empty request body: send a JSON object such as "
                            '{"text": "a red circle", "k": 10, "mode": "hybrid"}')
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, f"request body is not valid JSON: {err.msg} at line {err.lineno} "
                            f"column {err.colno}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except ValueError:  # an integer of more digits than Python converts (sys.int_info)
        raise ApiError(400, "request body holds a number too large to read") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"request body must be a JSON object, not {type(data).__name__}")
    try:
        return SearchRequest.model_validate(data, strict=True)
    except ValidationError as err:
        raise ApiError(422, describe_validation_error(err)) from None


def _form_parts(body: bytes, content_type: str) -> dict[str, tuple[bytes, bool]]:
    """``{field name: (bytes, is_file)}`` of a multipart/form-data body (stdlib parser)."""
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    try:
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    except Exception:  # malformed MIME; the parser's own text is not for the client
        raise ApiError(400, "malformed multipart body: not parseable as multipart/form-data") from None
    if not msg.is_multipart():
        raise ApiError(400, "malformed multipart body: no parts found (is the boundary right?)")
    out: dict[str, tuple[bytes, bool]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        is_file = part.get_param("filename", header="content-disposition") is not None
        if name in out:
            raise ApiError(422, f"form field '{name}' given more than once")
        out[name] = (payload, is_file)
    return out


def parse_form(body: bytes, content_type: str) -> tuple[SearchRequest, bytes | None]:
    """A multipart form as a :class:`SearchRequest` plus the uploaded image bytes (if a file)."""
    if "boundary=" not in content_type:
        raise ApiError(400, "multipart/form-data without a boundary parameter")
    parts = _form_parts(body, content_type)
    data: dict = {}
    upload: bytes | None = None
    fusion: dict = {}
    for name, (raw, is_file) in parts.items():
        if name == "image" and is_file:
            upload = raw
            continue
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, f"form field '{name}' is not UTF-8 text") from None
        if name == "image" and not value:
            continue
        if name == "allow_partial":
            if value not in ("true", "false"):
                raise ApiError(422, "allow_partial: must be true or false")
            data[name] = value == "true"
        elif name in ("k", "explain"):
            try:
                data[name] = int(value)
            except ValueError:
                raise ApiError(422, f"{name}: must be an integer, got {value[:40]!r}") from None
        elif name == "fusion":
            try:
                given = json.loads(value)
            except (ValueError, RecursionError):
                raise ApiError(422, "fusion: must be a JSON object") from None
            if not isinstance(given, dict):
                raise ApiError(422, "fusion: must be a JSON object")
            fusion.update(given)
        elif name.startswith("fusion."):
            key = name.split(".", 1)[1]
            if key == "method":
                fusion[key] = value
            else:
                try:
                    fusion[key] = float(value)
                except ValueError:
                    raise ApiError(422, f"{name}: must be a number, got {value[:40]!r}") from None
        else:
            data[name] = value
    if fusion:
        data["fusion"] = fusion
    try:
        req = SearchRequest.model_validate(data, strict=True)
    except ValidationError as err:
        raise ApiError(422, describe_validation_error(err)) from None
    if upload is not None and req.image is not None:
        raise ApiError(422, "image given twice (as a file and as a field)")
    return req, upload


def decode_base64_image(value: str, max_bytes: int) -> bytes:
    """Base64 (standard or URL-safe, optional ``data:image/...;base64,`` prefix) -> bytes."""
    if value.startswith("data:"):
        head, sep, rest = value.partition(",")
        if not sep or ";base64" not in head:
            raise ApiError(422, "image: a data: URI must be base64 encoded (data:image/png;base64,...)")
        value = rest
    value = "".join(value.split())
    if len(value) > (max_bytes * 4) // 3 + 8:
        raise ApiError(413, f"image: larger than the {max_bytes} byte limit")
    value = value.replace("-", "+").replace("_", "/")
    value += "=" * (-len(value) % 4)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "image: not valid base64") from None
    return data


def check_image(data: bytes, cfg: ServeConfig) -> None:
    """Reject empty, oversized (bytes or pixels) and undecodable images (never raises otherwise)."""
    from sdray.data import skips as S
    from sdray.data.decode import decode_image

    if not data:
        raise ApiError(422, "image: empty")
    if len(data) > cfg.max_image_bytes:
        raise ApiError(413, f"image: {len(data)} bytes, larger than the {cfg.max_image_bytes} byte limit")
    im, reason = decode_image(data, cfg.max_image_pixels)
    if im is None:
        if reason == S.IMAGE_TOO_LARGE:
            raise ApiError(413, f"image: more than {cfg.max_image_pixels} pixels")
        if reason == S.IMAGE_TRUNCATED:
            raise ApiError(422, "image: truncated image file")
        raise ApiError(422, "image: cannot be decoded (send a JPEG, PNG, WebP, GIF or BMP file)")


def to_query(req: SearchRequest, cfg: ServeConfig, upload: bytes | None = None) -> Query:
    """Apply the deployment's limits to a parsed request."""
    has_text = req.text is not None
    has_image = req.image is not None or upload is not None
    if has_text and has_image:
        raise ApiError(422, "give either text or image, not both")
    if not has_text and not has_image:
        raise ApiError(422, "give one of text (text -> images) or image (image -> captions)")
    text = None
    if has_text:
        text = req.text.strip()
        if not text:
            raise ApiError(422, "text: empty (give a non-blank query)")
        if len(text) > cfg.max_text_chars:
            raise ApiError(422, f"text: {len(text)} characters, more than the {cfg.max_text_chars} allowed")
    k = cfg.k_default if req.k is None else req.k
    if not 1 <= k <= cfg.k_max:
        raise ApiError(422, f"k: must be between 1 and {cfg.k_max}, got {k}")
    mode = cfg.default_mode if req.mode is None else req.mode
    if mode not in MODES:
        raise ApiError(422, f"mode: unknown mode {mode!r}; use one of {', '.join(MODES)}")
    fusion = req.fusion or FusionParams()
    if fusion.method is not None and fusion.method not in FUSIONS:
        raise ApiError(422, f"fusion.method: unknown {fusion.method!r}; use one of {', '.join(FUSIONS)}")
    image = None
    if has_image:
        image = upload if upload is not None else decode_base64_image(req.image, cfg.max_image_bytes)
        check_image(image, cfg)
    explain = cfg.explain_terms if req.explain is None else req.explain
    return Query(text=text, image=image, k=k, mode=mode, fusion=fusion, explain=explain,
                 allow_partial=bool(req.allow_partial))


def parse_request(body: bytes, content_type: str | None, cfg: ServeConfig) -> Query:
    """The whole path from raw body to :class:`Query`."""
    if len(body) > cfg.body_limit:
        raise ApiError(413, f"request body of {len(body)} bytes exceeds the {cfg.body_limit} byte limit")
    ctype = (content_type or "application/json").strip()
    base = ctype.split(";", 1)[0].strip().lower()
    if base in ("application/json", "text/json", "") or base.endswith("+json"):
        return to_query(parse_json(body), cfg)
    if base == "multipart/form-data":
        req, upload = parse_form(body, ctype)
        return to_query(req, cfg, upload)
    raise ApiError(415, f"unsupported content type {base!r}: send application/json or "
                        "multipart/form-data")
