"""Output written by the real ``img2dataset`` tool, in both of its formats, reads whole.

Generated images are served over HTTP on 127.0.0.1 from this test; two URLs answer 404 (failed
downloads upstream). img2dataset (the CLI, as docs/guide.md gives it) downloads the list once
as ``webdataset`` and once as ``parquet``; ``sdray featurize`` on the root holding both must keep
every downloaded sample, read no sidecar as a shard, count the failed rows, and keep ``url`` and
``key`` in the feature shards; ``sdray export`` of those features, and of an index built from
them, carries each image's source ``url``.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdray import storage
from sdray.config import BackboneConfig

pytestmark = pytest.mark.slow
N_OK, N_MISSING = 10, 2


def _img2dataset() -> str | None:
    cand = Path(sys.executable).parent / "img2dataset"
    return str(cand) if cand.exists() else shutil.which("img2dataset")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    from PIL import Image

    exe = _img2dataset()
    if exe is None:
        pytest.skip("img2dataset is not installed (pip install -e '.[test]')")
    tmp = tmp_path_factory.mktemp("img2dataset")
    (tmp / "www").mkdir()
    for i in range(N_OK):
        Image.new("RGB", (48 + i, 40), (20 * i, 90, 160)).save(tmp / "www" / f"{i}.jpg", quality=90)
    handler = functools.partial(_QuietHandler, directory=str(tmp / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [f"{base}/{i}.jpg" for i in range(N_OK)] + [f"{base}/missing-{i}.jpg"
                                                        for i in range(N_MISSING)]
    captions = [f"a generated picture number {i}" for i in range(len(urls))]
    pq.write_table(pa.table({"url": urls, "caption": captions}), tmp / "urls.parquet")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    procs = {}
    for fmt in ("webdataset", "parquet"):       # both at once: most of the time is start-up
        cmd = [exe, "--url_list", str(tmp / "urls.parquet"), "--input_format", "parquet",
               "--url_col", "url", "--caption_col", "caption", "--output_format", fmt,
               "--output_folder", str(tmp / "data" / fmt), "--processes_count", "1",
               "--thread_count", "4", "--number_sample_per_shard", "8", "--image_size", "64",
               "--resize_mode", "no", "--enable_wandb", "False"]
        procs[fmt] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT)
    for fmt, p in procs.items():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode(errors="replace")[-2000:]
    server.shutdown()
    return {"root": str(tmp / "data"), "urls": urls}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def featurized(ray_session, downloads, tmp_path_factory):
    from pipelines.featurize import featurize

    out = str(tmp_path_factory.mktemp("img2dataset-feat") / "feat")
    return out, featurize(downloads["root"], out, BackboneConfig(image_size=32), batch_size=8, progress=False)


def test_both_formats_read_whole(downloads, featurized):
    from pipelines.datasets import list_shards

    root = downloads["root"]
    files = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, fs in os.walk(root) for f in fs if not f.startswith("."))
    # what img2dataset wrote: tar + metadata parquet + stats per shard; parquet + stats
    assert {"webdataset/00000.tar", "webdataset/00000.parquet", "webdataset/00000_stats.json",
            "parquet/00000.parquet", "parquet/00000_stats.json"} <= set(files), files
    shards = [s[len(root) + 1:] for s in list_shards(root)]
    assert all(s.startswith("parquet/") or s.endswith(".tar") for s in shards), shards

    _, m = featurized
    assert m["n_samples"] == 2 * N_OK
    # failed rows are in img2dataset's parquet output; both formats' stats count them
    assert m["skips"] == {"download_failed": N_MISSING}
    assert m["upstream"] == {"failed_to_download": 2 * N_MISSING}
    for fmt in ("webdataset", "parquet"):
        tables = [pq.read_table(io.BytesIO(storage.read_bytes(f))) for f in m["files"]
                  if f"/{fmt}/" in f]
        t = pa.concat_tables(tables)
        assert sorted(t.column("url").to_pylist()) == sorted(downloads["urls"][:N_OK]), fmt
        keys = t.column("key").to_pylist()
        assert len(set(keys)) == N_OK
        sids = t.column("sample_id").to_pylist()      # <format folder>/<shard>/<key>
        assert all(s.split("/") in ([fmt, "00000", k], [fmt, "00001", k])
                   for s, k in zip(sids, keys)), sids
        caps = t.column("caption").to_pylist()
        assert all(c.startswith("a generated picture number") for c in caps)


def test_export_and_index_keep_source_urls(ray_session, downloads, featurized, tmp_path):
    from pipelines.cli import main as cli_main
    from pipelines.index import run_index
    from sdray.config import from_dict
    from sdray.export import read_vectors
    from sdray.model import RetrievalModel

    feats, _ = featurized
    model = str(tmp_path / "model")
    RetrievalModel.create(from_dict({"backbone": {"image_size": 32}})).save(model)
    want = sorted(downloads["urls"][:N_OK])
    run_index(model, feats, str(tmp_path / "index"), shards=2, progress=False)
    for how in (["--model", model, "--corpus", feats], ["--index", str(tmp_path / "index")]):
        for side in ("images", "captions"):
            out = str(tmp_path / f"{how[0][2:]}-{side}.parquet")
            assert cli_main(["export", *how, "--side", side, "--out", out]) == 0
            table, _ = read_vectors(storage.read_bytes(out))
            # both img2dataset formats downloaded the same images: one row per image (and caption)
            assert sorted(table.column("url").to_pylist()) == want, (how[0], side)
