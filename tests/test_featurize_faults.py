"""``sdray featurize`` against SeaweedFS behind a fault-injecting proxy: a burst of resets,
stalls and 503s mid-run is survived with every sample; an outage longer than the retry budget
fails the job naming the shard; a rerun once the store is back completes, nothing lost and
nothing duplicated."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest

from pipelines.cli import EXIT_STORAGE
from sdray import storage
from sdray.config import StorageConfig
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.slow

# tiny budgets: transient faults of about a second are survived, a longer outage is not
BUDGET = StorageConfig(max_attempts=3, connect_timeout_s=1, read_timeout_s=2, write_timeout_s=5,
                       body_attempts=1, shard_attempts=3, backoff_s=0.2, backoff_max_s=1, task_retries=1)
N_SHARDS, PER_SHARD = 6, 8


@pytest.fixture(scope="module")
def corpus(s3_server):
    from pipelines.synth import synth

    data = s3_server.uri("faults", "data")
    synth(data, n=N_SHARDS * PER_SHARD, n_val=0, n_test=0, captions_per_image=2, image_size=32,
          shard_size=PER_SHARD, splits=("train",), progress=False)
    return storage.join(data, "train")


def _run(data, out, capsys) -> tuple[int, str, float]:
    from pipelines.cli import main as cli

    t0 = time.monotonic()
    with storage.retries(BUDGET):
        rc = cli(["featurize", "--data", data, "--out", out, "--image-size", "32", "--batch-size", "8"])
    return rc, capsys.readouterr().err, time.monotonic() - t0


def _ids(out: str) -> list[str]:
    m = storage.read_json(storage.join(out, "manifest.json"))
    return [s for f in m["files"] for s in
            pq.read_table(f.replace("s3://", ""), filesystem=storage.filesystem(f)[0])
            .column("sample_id").to_pylist()]


def first_record_written(endpoint: str, out: str):
    """A condition for :meth:`FaultProxy.when`: some shard record of ``out`` exists, checked on
    the real server (not through the proxy)."""
    import s3fs

    opts = storage._s3_options()
    fs = s3fs.S3FileSystem(key=opts.get("key"), secret=opts.get("secret"),
                           client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    records = storage.join(out, "_shards")[len("s3://"):]

    def written() -> bool:
        fs.invalidate_cache()
        return bool(fs.exists(records) and fs.find(records))

    return written


def test_featurize_faults(ray_session, s3_server, corpus, monkeypatch, capsys):
    n_in = N_SHARDS * PER_SHARD
    with FaultProxy(s3_server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        # clean run through the proxy: the baseline
        clean = s3_server.uri("faults", "clean")
        rc, err, t_clean = _run(corpus, clean, capsys)
        assert rc == 0, err
        assert sorted(_ids(clean)) == sorted(set(_ids(clean))) and len(_ids(clean)) == n_in

        # a burst mid-run: open connections reset, 3 more resets, 2 stalls, 1 s of 503s
        burst = s3_server.uri("faults", "burst")

        def faults():
            proxy.reset(3)
            proxy.stall(2)
            proxy.answer_503(1.0)

        watcher = proxy.when(first_record_written(s3_server.endpoint, burst), faults)
        rc, err, t_burst = _run(corpus, burst, capsys)
        watcher.join(5)
        assert rc == 0, err
        assert sum(proxy.injected.values()) >= 5, proxy.injected
        ids = _ids(burst)
        assert len(ids) == len(set(ids)) == n_in and set(ids) == set(_ids(clean))

        # the store goes away for longer than the retry budget: the job fails, naming the shard
        down = s3_server.uri("faults", "down")
        watcher = proxy.when(first_record_written(s3_server.endpoint, down), proxy.down)
        rc, err, t_down = _run(corpus, down, capsys)
        watcher.join(5)
        assert rc == EXIT_STORAGE  # the central handler: one line, the storage exit code
        assert "sdray featurize: storage error:" in err and "reading shard s3://" in err and "attempts" in err
        # back up: the rerun completes what is missing, nothing lost, nothing twice
        proxy.up()
        rc, err, t_rerun = _run(corpus, down, capsys)
        assert rc == 0, err
        ids = _ids(down)
        assert len(ids) == len(set(ids)) == n_in
        m = storage.read_json(storage.join(down, "manifest.json"))
        assert m["n_samples"] == n_in and 0 < m["last_run"]["shards"] < N_SHARDS
    print(f"\nfeaturize {n_in} samples: clean {t_clean:.1f}s, burst {t_burst:.1f}s "
          f"(injected {proxy.injected}), outage failed after {t_down:.1f}s, rerun {t_rerun:.1f}s")
