"""Storage faults are retried or raised, never taken for bad data (real SeaweedFS behind a
fault-injecting proxy); bad data on a healthy store is still skipped and counted."""

from __future__ import annotations

import io
import tarfile
import time

import pytest

from sdray import storage
from sdray.config import ConfigError, StorageConfig
from sdray.data.skips import SkipCounts
from tests import data_fixtures as F
from tests.faultproxy import FaultProxy

# tiny budgets so that a permanent fault fails within seconds
FAST = StorageConfig(max_attempts=2, connect_timeout_s=1, read_timeout_s=1, write_timeout_s=3, body_attempts=1,
                     shard_attempts=3, backoff_s=0.05, backoff_max_s=0.2, task_retries=1)


@pytest.fixture()
def proxied(s3_server, monkeypatch):
    """The S3 test server behind a :class:`FaultProxy`; storage calls go through the proxy."""
    with FaultProxy(s3_server.port) as proxy, storage.retries(FAST):
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield proxy


def _read(uri: str):
    from pipelines.datasets import read_shard_rows

    counts = SkipCounts()
    rows = read_shard_rows(uri, counts, 4096, shard="x")
    return rows, counts


def test_config_from_env_and_botocore_settings():
    cfg = StorageConfig.from_env({"SDRAY_STORAGE_MAX_ATTEMPTS": "7",
                                  "SDRAY_STORAGE_RETRY_MODE": "adaptive"})
    assert cfg.max_attempts == 7 and cfg.retry_mode == "adaptive"
    assert StorageConfig.from_env(cfg.to_env()) == cfg
    with pytest.raises(ConfigError, match="max_attempts"):
        StorageConfig.from_env({"SDRAY_STORAGE_MAX_ATTEMPTS": "0"})
    with storage.retries(cfg):
        opts = storage._s3_options()
    assert opts["config_kwargs"]["retries"] == {"mode": "adaptive", "max_attempts": 7}


def test_transient_faults_are_survived(s3_server, proxied):
    uri = s3_server.uri("faults", "unit", "00000.tar")
    storage.write_bytes(uri, F.img2dataset_tar(6))
    proxied.reset(2)                             # resets: botocore retries the request
    rows, counts = _read(uri)
    assert len(rows) == 6 and not counts
    proxied.answer_503(0.6)                      # throttling for a while
    rows, counts = _read(uri)
    assert len(rows) == 6 and not counts
    proxied.stall(1)                             # a connection that never answers: read timeout
    rows, counts = _read(uri)
    assert len(rows) == 6 and not counts
    assert proxied.injected["reset"] == 2 and proxied.injected["stall"] == 1
    assert proxied.injected["503"] >= 1


def test_outage_raises_naming_the_shard_and_never_returns_a_short_shard(s3_server, proxied):
    uri = s3_server.uri("faults", "unit", "00001.tar")
    storage.write_bytes(uri, F.img2dataset_tar(4))
    proxied.down()
    t0 = time.monotonic()
    with pytest.raises(storage.ShardStorageError, match="00001.tar") as info:
        _read(uri)
    assert time.monotonic() - t0 < 30
    assert "3 attempts" in str(info.value)
    proxied.up()
    assert len(_read(uri)[0]) == 4


def test_corrupt_data_on_a_healthy_store_is_skipped_not_raised(s3_server, proxied):
    whole = F.img2dataset_tar(6)
    cut = tarfile.open(fileobj=io.BytesIO(whole)).getmembers()[10].offset_data + 5
    storage.write_bytes(s3_server.uri("faults", "unit", "cut.tar"), whole[:cut])
    storage.write_bytes(s3_server.uri("faults", "unit", "junk.tar"), b"\x00junk" * 50)
    rows, counts = _read(s3_server.uri("faults", "unit", "cut.tar"))
    assert len(rows) == 3 and counts.to_dict() == {"shard_truncated": 1}
    rows, counts = _read(s3_server.uri("faults", "unit", "junk.tar"))
    assert rows == [] and counts.to_dict() == {"shard_unreadable": 1}


def test_a_missing_shard_is_a_fault(tmp_path):
    from pipelines.datasets import read_shard_rows

    with pytest.raises(storage.ShardStorageError, match="gone.tar"):
        read_shard_rows(str(tmp_path / "gone.tar"), SkipCounts(), 4096)


def test_storage_fault_is_found_behind_wrappers():
    inner = storage.ShardStorageError("reading shard s3://b/x/00001.tar failed after 3 attempts")
    try:
        try:
            raise inner
        except storage.ShardStorageError as err:
            raise RuntimeError("UDF failed to process a data block") from err
    except RuntimeError as outer:
        assert storage.storage_fault(outer) is inner
    text = RuntimeError("Traceback ...\nsdray.storage.ShardStorageError: reading shard s3://b/y.tar "
                        "failed after 2 attempts (EndpointConnectionError: refused)")
    found = storage.storage_fault(text)
    assert isinstance(found, storage.ShardStorageError) and str(found).startswith("reading shard s3://b/y.tar")
    assert storage.storage_fault(ValueError("no sample kept")) is None


def test_a_write_is_retried_whole_and_a_lasting_fault_names_the_object(s3_server, proxied):
    uri = s3_server.uri("faults-unit", "written.bin")
    proxied.stall(1)             # a stalled PUT outlives botocore's timeouts: the write is retried
    proxied.reset(2)
    storage.write_bytes(uri, b"x" * 1000)
    assert storage.read_bytes(uri) == b"x" * 1000
    proxied.down()
    with pytest.raises(storage.ShardStorageError, match=r"writing s3://.*written\.bin failed after 3 attempts"):
        storage.write_bytes(uri, b"y")


def test_checkpoint_filesystem_takes_sdray_retries(s3_server, proxied):
    """Ray Train's checkpoints go through pyarrow's own S3 client (not fsspec/botocore):
    :func:`storage.pyarrow_s3` gives it this job's endpoint and StorageConfig, so the attempt
    budget applies to checkpoints too: with one attempt a reset fails the upload loudly, with
    max_attempts x shard_attempts = 6 four resets in a row are survived."""
    uri = s3_server.uri("faults-unit", "checkpoint.bin")

    def put(cfg: StorageConfig) -> None:
        with storage.retries(cfg):
            fs, path = storage.pyarrow_s3(uri)
        with fs.open_output_stream(path) as f:
            f.write(b"z" * 1000)

    proxied.reset(1)
    with pytest.raises(OSError, match="checkpoint.bin"):
        put(FAST.model_copy(update={"max_attempts": 1, "shard_attempts": 1}))
    proxied.clear()
    proxied.reset(4)
    put(FAST)
    proxied.clear()
    assert storage.read_bytes(uri) == b"z" * 1000


def test_listing_and_exists_are_retried(s3_server, proxied):
    uri = s3_server.uri("faults-unit", "listed")
    storage.write_bytes(storage.join(uri, "a.bin"), b"a")
    proxied.reset(3)             # more than botocore's 2 attempts per request
    assert storage.list_files(uri) == [storage.join(uri, "a.bin")]
    proxied.reset(3)
    assert storage.exists(storage.join(uri, "a.bin"))
    proxied.down()
    with pytest.raises(storage.ShardStorageError, match=r"listing s3://.*listed failed after 3 attempts"):
        storage.list_files(uri)
