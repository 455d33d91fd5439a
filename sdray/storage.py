"""URIs for every artifact: local paths and ``s3://bucket/key`` through fsspec/s3fs.

S3 settings come from the standard AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) plus ``AWS_ENDPOINT_URL`` for an S3-compatible
server (SeaweedFS, MinIO). Ray workers inherit them only if they are set before ``ray.init``.

Transient faults (connection resets, timeouts, 5xx, throttling) are retried by botocore and s3fs
as :class:`~sdray.config.StorageConfig` says (:func:`configure_retries`); a shard that still cannot
be read after :func:`read_shard_bytes`'s own bounded attempts raises :class:`ShardStorageError`
naming the shard, for the caller's task to fail (and Ray to retry it). Storage errors are never
mistaken for bad data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from typing import Any, Callable, TypeVar

import fsspec

from sdray.config import StorageConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_remote(uri: str) -> bool:
    """True for ``s3://`` (or any other ``scheme://``) URIs, False for local paths."""
    return "://" in str(uri) and not str(uri).startswith("file://")


class StorageError(OSError):
    """An object-store failure with a message that names the URI and the likely cause."""


class ShardStorageError(StorageError):
    """A shard or other object that could not be read or written after every retry: a fault,
    not bad data. Ray Data retries the task on it; when those retries run out too, the job
    fails with this message, which names the object and the cause."""


_S3_OVERRIDES: dict[str, str] = {}
_RETRIES: StorageConfig | None = None


def retry_config() -> StorageConfig:
    """The storage retry settings in effect (:func:`configure_retries`, else the environment)."""
    global _RETRIES
    if _RETRIES is None:
        _RETRIES = StorageConfig.from_env()
    return _RETRIES


def configure_retries(cfg: StorageConfig | dict | None, export_env: bool = True) -> StorageConfig:
    """Use ``cfg`` for every later storage call in this process (``None``: the environment's).

    With ``export_env`` the settings are also written to ``os.environ`` (``SDRAY_STORAGE_*``) so
    that Ray workers started afterwards, and :func:`s3_env`, carry them.
    """
    global _RETRIES
    if cfg is None:
        _RETRIES = StorageConfig.from_env()
    else:
        _RETRIES = cfg if isinstance(cfg, StorageConfig) else StorageConfig.model_validate(cfg)
    if export_env:
        os.environ.update(_RETRIES.to_env())
    return _RETRIES


def configure_s3(endpoint_url: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, region: str | None = None,
                 export_env: bool = True) -> None:
    """Set S3 settings from config instead of the environment.

    With ``export_env`` (default) they are also written to ``os.environ`` as the standard AWS
    variables, so Ray workers started *afterwards* (``ray.init``) inherit them; see
    :func:`s3_env` for passing them through ``runtime_env`` instead.
    """
    values = {"AWS_ENDPOINT_URL": endpoint_url, "AWS_ACCESS_KEY_ID": access_key,
              "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_DEFAULT_REGION": region}
    for key, value in values.items():
        if value is None:
            continue
        _S3_OVERRIDES[key] = value
        if export_env:
            os.environ[key] = value


@contextlib.contextmanager
def retries(cfg: StorageConfig | None):
    """Use ``cfg`` (if not ``None``) for storage calls in this process within the block."""
    global _RETRIES
    if cfg is None:
        yield retry_config()
        return
    saved, _RETRIES = _RETRIES, cfg
    try:
        yield cfg
    finally:
        _RETRIES = saved


def storage_fault(err: BaseException) -> StorageError | None:
    """The :class:`StorageError` behind ``err`` (e.g. inside a Ray task error), or ``None``."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        inner = [e.__context__, e.__cause__, getattr(e, "cause", None)]   # popped last first
        if isinstance(e, StorageError) and not any(isinstance(i, StorageError) for i in inner):
            return e                # the innermost one, not a Ray wrapper that subclasses it
        stack += inner
    # across processes the chain may survive only as text (a Ray task's traceback)
    for line in reversed(str(err).splitlines()):
        _, found, message = line.partition(f"{ShardStorageError.__name__}: ")
        if found:
            return ShardStorageError(message.strip())
    return None


def _setting(key: str) -> str | None:
    return _S3_OVERRIDES.get(key) or os.environ.get(key)


def s3_env() -> dict[str, str]:
    """The AWS settings in effect, for ``ray.init(runtime_env={"env_vars": s3_env()})``."""
    keys = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")
    env = {k: v for k in keys if (v := _setting(k))}
    env.update({k: v for k, v in os.environ.items() if k.startswith(StorageConfig.ENV_PREFIX)})
    return env


def _s3_options() -> dict[str, Any]:
    opts: dict[str, Any] = {}
    endpoint = _setting("AWS_ENDPOINT_URL_S3") or _setting("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    # Explicit keys (not only botocore's own env lookup) so that fsspec's instance cache, keyed
    # by these arguments, never hands out a filesystem built with other credentials.
    key, secret = _setting("AWS_ACCESS_KEY_ID"), _setting("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        opts["key"], opts["secret"] = key, secret
        if _setting("AWS_SESSION_TOKEN"):
            opts["token"] = _setting("AWS_SESSION_TOKEN")
    cfg = retry_config()
    opts["config_kwargs"] = {"retries": {"mode": cfg.retry_mode, "max_attempts": cfg.max_attempts},
                             "connect_timeout": cfg.connect_timeout_s,
                             "read_timeout": cfg.read_timeout_s}
    return opts


_CREDENTIAL_HINTS = ("invalidaccesskeyid", "signaturedoesnotmatch", "access key", "accessdenied",
                     "access denied", "forbidden", "credentials", "expiredtoken", "403")


def explain_error(uri: str, err: BaseException) -> StorageError:
    """A :class:`StorageError` naming ``uri`` and, for auth failures, the credential settings."""
    text = f"{type(err).__name__}: {err}"
    low = text.lower()
    if isinstance(err, PermissionError) or any(h in low for h in _CREDENTIAL_HINTS):
        endpoint = _setting("AWS_ENDPOINT_URL_S3") or _setting("AWS_ENDPOINT_URL") or "AWS default"
        key = _setting("AWS_ACCESS_KEY_ID")
        shown = f"{key[:4]}…" if key else "none set"
        return StorageError(
            f"access to {uri} was refused: the S3 credentials are wrong or lack permission "
            f"(endpoint {endpoint}, AWS_ACCESS_KEY_ID {shown}); check AWS_ACCESS_KEY_ID / "
            f"AWS_SECRET_ACCESS_KEY (or storage.configure_s3). Server said: {text}")
    if "nosuchbucket" in low or "bucket" in low and "not" in low and "exist" in low:
        return StorageError(f"{uri}: the bucket does not exist ({text})")
    if "could not connect" in low or "connect" in low and "endpoint" in low:
        return StorageError(f"{uri}: cannot reach the S3 endpoint "
                            f"{_setting('AWS_ENDPOINT_URL') or '(AWS default)'} ({text})")
    return StorageError(f"{uri}: {text}")


def check_access(uri: str, write: bool = False) -> None:
    """Fail early with a clear :class:`StorageError` if ``uri`` cannot be listed (or written).
    Transient faults are retried like any read (:func:`call_with_retries`)."""
    if not is_remote(uri):
        return
    fs, path = filesystem(uri)

    def probe() -> None:
        fs.ls(path.split("/", 1)[0], refresh=True)
        if write:
            fs.pipe(f"{path}/.sdray-write-probe", b"")
            fs.rm(f"{path}/.sdray-write-probe")

    try:
        call_with_retries(probe, f"checking access to {uri}")
    except FileNotFoundError as err:
        raise StorageError(f"{uri}: the bucket does not exist ({err})") from err
    except ShardStorageError as err:
        raise explain_error(uri, err.__cause__ or err) from err
    except Exception as err:
        raise explain_error(uri, err) from err


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for ``uri``; ``path`` is what ``fs`` methods take (no scheme for s3)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        fs = fsspec.filesystem("s3", **_s3_options())
        fs.retries = retry_config().body_attempts   # s3fs's own layer (cut bodies, timeouts)
        return fs, uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return fsspec.filesystem("file"), os.path.abspath(uri)


def pyarrow_filesystem(uri: str):
    """``(pyarrow FileSystem, path)`` for readers such as Ray Data and ``pyarrow.parquet``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def pyarrow_s3(uri: str):
    """``(pyarrow S3FileSystem, path)`` with this process's endpoint, credentials and
    :class:`~sdray.config.StorageConfig` retries and timeouts, for libraries that write through
    pyarrow's own S3 client, e.g. Ray Train checkpoints (``RunConfig(storage_filesystem=...)``).

    Without it Ray Train resolves ``s3://`` with ``pyarrow.fs.FileSystem.from_uri``: the AWS
    SDK's default retries and timeouts, whatever ``SDRAY_STORAGE_*`` says.
    """
    from urllib.parse import urlparse

    import pyarrow.fs as pafs

    if not str(uri).startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    cfg = retry_config()
    kwargs: dict[str, Any] = {
        # pyarrow has no whole-object layer above its requests: they get the attempts that
        # write_bytes would make in all (botocore's per request x call_with_retries' per object)
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts * cfg.shard_attempts),
        "connect_timeout": cfg.connect_timeout_s, "request_timeout": cfg.read_timeout_s}
    endpoint = _setting("AWS_ENDPOINT_URL_S3") or _setting("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    key, secret = _setting("AWS_ACCESS_KEY_ID"), _setting("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=_setting("AWS_SESSION_TOKEN"))
    region = _setting("AWS_DEFAULT_REGION") or _setting("AWS_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), str(uri)[len("s3://"):].rstrip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/``."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def exists(uri: str) -> bool:
    """Whether ``uri`` exists; on S3 retried like a read (a fault is never taken for "absent")."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        return fs.exists(path)
    return call_with_retries(lambda: fs.exists(path), f"checking {uri}")


def makedirs(uri: str) -> None:
    """Create a folder (local) or nothing (object stores have no folders)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def open_uri(uri: str, mode: str = "rb"):
    """Open a file at ``uri``; parent folders are created for local writes."""
    fs, path = filesystem(uri)
    if "w" in mode and not is_remote(uri):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.open(path, mode)


def _read_once(uri: str) -> bytes:
    with open_uri(uri, "rb") as f:
        return f.read()


def read_bytes(uri: str) -> bytes:
    """All bytes at ``uri``. Remote reads are retried whole (:func:`call_with_retries`): a missing
    object raises ``FileNotFoundError`` at once, a fault past the retries
    :class:`ShardStorageError` naming ``uri``."""
    if not is_remote(uri):
        return _read_once(uri)
    return call_with_retries(lambda: _read_once(uri), f"reading {uri}")


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``. On S3 one ``put_object`` with the bytes as body: a file-like
    body would make botocore send ``Expect: 100-continue``, whose wait has no timeout, so a
    stalled server would hang the write forever instead of timing out (``read_timeout_s``). Each
    attempt also has a deadline, ``write_timeout_s`` (fsspec raises ``FSTimeoutError``), since
    a stalled upload was seen to outlive every socket timeout; the whole write is retried
    (:func:`call_with_retries`), then fails with :class:`ShardStorageError` naming ``uri``."""
    if is_remote(uri):
        fs, path = filesystem(uri)
        body = bytes(data)
        call_with_retries(lambda: fs.pipe_file(path, body, timeout=retry_config().write_timeout_s),
                          f"writing {uri}")
        return
    with open_uri(uri, "wb") as f:
        f.write(data)


def call_with_retries(fn: Callable[[], T], what: str, cfg: StorageConfig | None = None) -> T:
    """``fn()`` (storage I/O only), retried ``cfg.shard_attempts`` times with exponential backoff
    and full jitter; :class:`ShardStorageError` naming ``what`` and the cause if every attempt
    failed. A missing object or refused credentials are not transient: raised at once, unchanged.
    """
    cfg = cfg or retry_config()
    last: BaseException | None = None
    for attempt in range(cfg.shard_attempts):
        if attempt:
            wait = random.uniform(0.0, min(cfg.backoff_max_s, cfg.backoff_s * 2 ** (attempt - 1)))
            log.warning("%s: attempt %d/%d failed (%s: %s); retrying in %.1fs", what, attempt,
                        cfg.shard_attempts, type(last).__name__, last, wait)
            time.sleep(wait)
        try:
            return fn()
        except (PermissionError, FileNotFoundError):
            raise
        except Exception as err:  # I/O only: reset, timeout, 5xx, throttling, cut body
            last = err
    raise ShardStorageError(f"{what} failed after {cfg.shard_attempts} attempts "
                            f"({type(last).__name__}: {last})") from last


def read_shard_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    """All bytes of the shard at ``uri`` (:func:`call_with_retries`); a missing or forbidden
    shard raises :class:`ShardStorageError` too. Only I/O happens here, so any error is a fault."""
    try:
        return call_with_retries(lambda: _read_once(uri), f"reading shard {uri}", cfg)
    except (PermissionError, FileNotFoundError) as err:
        raise ShardStorageError(f"reading shard {uri}: {explain_error(uri, err)}") from err


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def list_files(uri: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Sorted URIs of the files under ``uri`` (recursive), keeping only ``suffixes`` if given."""
    fs, path = filesystem(uri)

    def find() -> list[str]:
        if is_remote(uri):
            fs.invalidate_cache()       # other processes (Ray workers) may have written
        if not fs.exists(path):
            return []
        if fs.isfile(path):
            return [path]
        return [p for p in fs.find(path) if not fs.isdir(p)]

    if not is_remote(uri):
        found = find()
    else:           # retried like a read; refused credentials fail at once, explained
        try:
            found = call_with_retries(find, f"listing {uri}")
        except PermissionError as err:
            raise explain_error(uri, err) from err
    prefix = "s3://" if str(uri).startswith("s3://") else ""
    keep = [p for p in found if not suffixes or p.endswith(suffixes)]
    return sorted(prefix + p for p in keep)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write so that readers never see a partial file (local: temp file + rename; S3 PUTs
    are atomic already)."""
    if is_remote(uri):
        write_bytes(uri, data)
        return
    _, path = filesystem(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder's files to ``uri`` (recursive)."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as f:
                write_bytes(join(uri, rel), f.read())


def download_dir(uri: str, local_dir: str) -> None:
    """Copy every file under ``uri`` into ``local_dir``, keeping relative paths."""
    base = str(uri).rstrip("/")
    for file_uri in list_files(uri):
        rel = file_uri[len(base):].lstrip("/")
        dst = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as f:
            f.write(read_bytes(file_uri))
