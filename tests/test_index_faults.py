"""``sdray index`` against SeaweedFS behind a fault-injecting proxy (feature shards read from
s3://, index shards written to s3://): an outage longer than the retry budget fails the job with
the storage exit code, naming the object; the rerun once the store is back resumes the build
through bursts of resets, stalls and 503s, and the index holds exactly the input's documents,
nothing lost and nothing duplicated. (Two index runs: each costs ~50 s on the 2-core machine.)"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import EXIT_STORAGE
from sdray import storage
from tests.faultproxy import FaultProxy
from tests.test_featurize_faults import BUDGET

pytestmark = pytest.mark.slow

N_FILES, PER_FILE, N_SHARDS = 4, 8, 4


@pytest.fixture(scope="module")
def setup(ray_session, s3_server, tmp_path_factory):
    return make_corpus(s3_server.uri("indexfaults"), str(tmp_path_factory.mktemp("indexfaults")))


def make_corpus(root: str, workdir: str, n_files: int = N_FILES, per_file: int = PER_FILE) -> dict:
    """A tiny model and feature shards (as featurize writes them) under ``root`` (written with
    the storage settings in effect: for the tests, the real server, not the proxy); the
    documents the index must hold, per side."""
    import io
    import os

    from pipelines.index import caption_id
    from sdray.backbones import save_tiny
    from sdray.config import from_dict
    from sdray.model import RetrievalModel

    tiny = save_tiny("clip", os.path.join(workdir, "tinyclip"))
    cfg = from_dict({"backbone": {"name": "clip", "path": str(tiny), "image_size": 32, "max_text_length": 64},
                     "heads": {"topk_text": 8, "topk_image": 8}})
    model = RetrievalModel.create(cfg)
    model.save(storage.join(root, "model"))
    td, idim = model.backbone.text_dim, model.backbone.image_dim
    rng = np.random.default_rng(5)
    images, captions = set(), set()
    for f in range(n_files):
        sids = [f"part-{f}/{i:04d}" for i in range(per_file)]
        caps = [f"caption {f} {i}" for i in range(per_file)]
        table = pa.table({
            "sample_id": sids, "image_id": sids, "caption": caps,
            "text_features": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.standard_normal(per_file * td).astype(np.float32)), td),
            "image_features": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.standard_normal(per_file * idim).astype(np.float32)), idim)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(storage.join(root, "features", f"part-{f}.parquet"), buf.getvalue())
        images |= set(sids)
        captions |= {caption_id(c) for c in caps}
    return {"root": root, "model": storage.join(root, "model"), "corpus": storage.join(root, "features"),
            "expected": {"images": images, "captions": captions}}


def _run(setup, out, capsys) -> tuple[int, str, str, float]:
    from pipelines.cli import main as cli

    t0 = time.monotonic()
    with storage.retries(BUDGET):
        rc = cli(["index", "--model", setup["model"], "--corpus", setup["corpus"], "--out", out,
                  "--shards", str(N_SHARDS), "--dense-index", "flat", "--set", "sparse.min_docs=100000",
                  "--batch-size", "8"])
    printed = capsys.readouterr()
    return rc, printed.out, printed.err, time.monotonic() - t0


def doc_ids(out: str) -> dict[str, list[str]]:
    """Every document id of the published index, per side (copies kept: duplicates show)."""
    from sdray.index import Retriever

    r = Retriever.load(out)
    try:
        return {side: [i for shard in r.shards[side] for i in shard.meta["id"]] for side in r.sides}
    finally:
        r.close()


def server_has(endpoint: str, prefix: str, needle: str):
    """A condition for :meth:`FaultProxy.when`: an object whose key holds ``needle`` and that
    was not there when the condition was made exists under ``prefix``; checked on the real
    server (not through the proxy)."""
    import s3fs

    opts = storage._s3_options()
    fs = s3fs.S3FileSystem(key=opts.get("key"), secret=opts.get("secret"),
                           client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    path = prefix[len("s3://"):]

    def keys() -> set[str]:
        fs.invalidate_cache()
        return {p for p in fs.find(path) if needle in p} if fs.exists(path) else set()

    before = keys()
    return lambda: bool(keys() - before)


def _assert_whole(setup, out):
    ids = doc_ids(out)
    for side, expected in setup["expected"].items():
        assert len(ids[side]) == len(set(ids[side])) == len(expected), side
        assert set(ids[side]) == expected, side


def test_index_faults(setup, s3_server, monkeypatch, capsys):
    for key, value in BUDGET.to_env().items():      # the job's Ray workers take these too
        monkeypatch.setenv(key, value)
    times = {}
    with FaultProxy(s3_server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        # the store goes away once the first index file is written, for longer than the budget
        out = storage.join(setup["root"], "index")
        watcher = proxy.when(server_has(s3_server.endpoint, out, "/shard-"), proxy.down, poll=0.05)
        rc, _, err, times["outage"] = _run(setup, out, capsys)
        watcher.join(5)
        assert rc == EXIT_STORAGE, err
        line = [ln for ln in err.splitlines() if ln.startswith("sdray index:")]
        assert line and "storage error" in line[-1] and "attempts" in line[-1], err
        assert f"{out}/" in line[-1] and "shard-" in line[-1], line[-1]   # names the object

        # back up: the rerun resumes the pending version through two bursts of faults: resets and
        # stalls as it starts (driver and feature reads), resets and 503s once it writes index files
        proxy.up()
        before = _building(out)

        def writes_burst():
            proxy.reset(3)
            proxy.answer_503(2.0, at_least=1)   # the resets' backoff may outlast the window

        proxy.reset(3)
        proxy.stall(2)
        watcher = proxy.when(server_has(s3_server.endpoint, storage.join(out, before["version"]), "/shard-"),
                             writes_burst, poll=0.05)
        rc, printed, err, times["rerun"] = _run(setup, out, capsys)
        watcher.join(5)
        assert rc == 0, err
        assert proxy.injected["reset"] >= 6 and proxy.injected["stall"] >= 2, proxy.injected
        assert proxy.injected["503"] >= 1, proxy.injected
        assert f"version {before['version']}" in printed, printed   # resumed, not a new version
        _assert_whole(setup, out)
    print(f"\nindex {N_FILES * PER_FILE} samples into {N_SHARDS} shards: " +
          ", ".join(f"{k} {v:.1f}s" for k, v in times.items()) +
          f" (injected {proxy.injected}); outage: {line[-1][:300]}; rerun: {printed.strip().splitlines()[-1]}")


def _building(out: str) -> dict:
    from sdray.index import manifest as mf

    return storage.read_json(storage.join(out, mf.BUILDING))
