"""API keys, per-key rate limits and signed thumbnail URLs of the ingress (pure Python, no Ray).

* :class:`KeyRing`: named read-only API keys from ``ServeConfig.auth_token`` (name ``default``),
  a file of ``name:key`` lines (``api_keys_file``; a mounted Kubernetes Secret) and the
  environment (``$SDRAY_API_KEYS``, comma or newline separated ``name:key``). A presented key is
  compared with every key by :func:`hmac.compare_digest` (constant time; no early exit), so the
  response time does not reveal how much of a key matched or which key it was close to.
* :class:`RateLimiter`: a token bucket per key name (``rate`` tokens/s, ``burst`` deep); a
  request that finds the bucket empty gets 429 with the seconds until a token is back. Buckets
  live in one ingress replica: the cluster-wide limit is ``rate × ingress replicas``.
* :func:`sign_image_url` / :func:`check_image_signature`: ``/v1/images/{id}`` URLs carry
  ``exp`` (Unix seconds) and ``sig`` = HMAC-SHA256(secret, ``id|size|exp``) instead of a key, so an
  ``<img src>`` works without putting a key in a URL, and a leaked URL opens one thumbnail for
  ``image_url_ttl_s``. The secret is derived from the keys (every ingress replica agrees on it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
import time
from dataclasses import dataclass

from serve.request import ApiError

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_KEY_CHARS = 8


def parse_keys(text: str, source: str) -> dict[str, str]:
    """``{name: key}`` from ``name:key`` entries (lines or commas; ``#`` comments, blanks ignored)."""
    keys: dict[str, str] = {}
    for n, raw in enumerate(re.split(r"[\n,]", text), 1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, sep, key = entry.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not _NAME.match(name):
            raise ValueError(f"{source}: entry {n} is not 'name:key' with a name of letters, digits, _.@-")
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"{source}: key {name!r} is shorter than {MIN_KEY_CHARS} characters")
        if name in keys:
            raise ValueError(f"{source}: key name {name!r} given twice")
        keys[name] = key
    return keys


class KeyRing:
    """Named API keys; :meth:`identify` returns the name of the key presented (or raises 401)."""

    def __init__(self, keys: dict[str, str]):
        self._keys = [(name, key.encode()) for name, key in sorted(keys.items())]

    @classmethod
    def from_config(cls, cfg, environ: dict | None = None) -> "KeyRing":
        environ = os.environ if environ is None else environ
        keys: dict[str, str] = {}
        if cfg.auth_token:
            keys["default"] = cfg.auth_token
        if cfg.api_keys_file:
            with open(cfg.api_keys_file, encoding="utf-8") as f:
                keys.update(parse_keys(f.read(), cfg.api_keys_file))
        if environ.get(cfg.api_keys_env):
            keys.update(parse_keys(environ[cfg.api_keys_env], f"${cfg.api_keys_env}"))
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def names(self) -> list[str]:
        return [name for name, _ in self._keys]

    def identify(self, presented: str | None) -> str:
        """The key's name; ``anonymous`` when no keys are configured; ApiError(401) otherwise."""
        if not self._keys:
            return "anonymous"
        given = (presented or "").encode()
        found = None
        for name, key in self._keys:  # every key compared, whatever matched
            if hmac.compare_digest(given, key) and found is None:
                found = name
        if presented is None or found is None:
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
        return found

    def signing_secret(self) -> bytes:
        """Secret for signed image URLs, the same on every replica holding the same keys."""
        h = hashlib.sha256(b"sdray image urls\0")
        for name, key in self._keys:
            h.update(name.encode() + b"\0" + key + b"\0")
        return h.digest()


def bearer(headers) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    header = headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token bucket per key name; :meth:`check` raises ApiError(429) with ``retry_after``.

    ``rate`` (requests/s) and ``burst`` are the whole deployment's: with ``replicas`` ingress
    replicas each one's bucket fills at ``rate / replicas`` and holds ``burst / replicas``
    (at least 1), so N replicas together allow ``rate``, not N × ``rate``, as long as the
    proxy spreads a key's requests over them evenly (Serve's router picks the less busy of two
    random replicas). :attr:`replicas` is set by the ingress from the Serve controller.
    """

    def __init__(self, rate: float | None, burst: int, clock=time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.replicas = 1
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def check(self, name: str) -> None:
        if not self.rate:
            return
        now = self.clock()
        rate = self.rate / self.replicas
        burst = max(1.0, self.burst / self.replicas)
        with self._lock:
            b = self._buckets.setdefault(name, _Bucket(burst, now))
            b.tokens = min(burst, b.tokens + (now - b.stamp) * rate)
            b.stamp = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return
            wait = (1.0 - b.tokens) / rate
        err = ApiError(429, f"rate limit of {self.rate:g} requests/s for key {name!r} exceeded")
        err.retry_after = wait
        raise err


def _message(doc_id: str, size: int, expires: int) -> bytes:
    return f"{doc_id}|{size}|{expires}".encode()


def sign_image_url(secret: bytes, doc_id: str, size: int, ttl_s: int, now: float | None = None) -> str:
    """Query string ``size=..&exp=..&sig=..`` authorising one thumbnail until ``now + ttl_s``."""
    expires = int((time.time() if now is None else now) + ttl_s)
    sig = hmac.new(secret, _message(doc_id, size, expires), hashlib.sha256).hexdigest()
    return f"size={size}&exp={expires}&sig={sig}"


def check_image_signature(secret: bytes, doc_id: str, size: int, exp: str | None, sig: str | None,
                          now: float | None = None) -> bool:
    """True when ``sig`` signs ``(doc_id, size, exp)`` and ``exp`` has not passed."""
    if not exp or not sig or not exp.isdigit() or len(exp) > 12:
        return False
    if int(exp) < (time.time() if now is None else now):
        return False
    want = hmac.new(secret, _message(doc_id, size, int(exp)), hashlib.sha256).hexdigest()
    return hmac.compare_digest(want.encode(), sig.encode()[:128])
