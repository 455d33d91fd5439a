"""Index lifecycle: list, rollback, gc on a local root and on S3, through the library and the CLI."""

import json

import numpy as np
import pytest

from pipelines.cli import main as cli_main
from sdray import storage
from sdray.index import IndexConfig, Retriever, ShardData, build_index
from sdray.index import manifest as mf
from sdray.index import versions as ver
from serve.shard_group import current_version as serve_current_version

VERSIONS = [f"v2026010{d}T000000Z-00000{d}" for d in range(1, 5)]


def _data(seed: int, n: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(n, 8)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    sparse = np.where(rng.random((n, 20)) < 0.3, rng.random((n, 20)), 0).astype(np.float32)
    ids = [f"img-{seed}-{i}" for i in range(n)]
    return {"images": ShardData(dense=dense, sparse=sparse, ids=ids, image_ids=ids, captions=ids,
                                uris=[None] * n, vocab_size=20)}


def _publish_all(root: str) -> None:
    for seed, version in enumerate(VERSIONS):
        build_index(root, _data(seed), n_shards=2, config=IndexConfig(), version=version)


def _check_lifecycle(root: str, capsys) -> None:
    _publish_all(root)
    # an abandoned partial version (older than everything) and a build in progress (newest)
    storage.write_bytes(storage.join(root, "v20251231T000000Z-dead00", "shard-00000", "x"), b"partial")
    storage.write_bytes(storage.join(root, "v20260201T000000Z-0b0110", "shard-00000", "x"), b"building")
    mf.write_atomic(storage.join(root, mf.BUILDING), json.dumps({"version": "v20260201T000000Z-0b0110"}).encode())

    found = ver.list_versions(root)
    assert [v.version for v in found] == ["v20260201T000000Z-0b0110", *VERSIONS[::-1], "v20251231T000000Z-dead00"]
    assert [v.state for v in found] == ["partial", *["published"] * 4, "partial"]
    assert [v.version for v in found if v.current] == [VERSIONS[-1]]
    assert found[0].building and found[1].counts == {"images": 6}

    assert cli_main(["index", "rollback", VERSIONS[1], root]) == 0
    assert mf.current_version(root) == VERSIONS[1]
    # what a running Serve app polls (it swaps whenever this differs from the version it serves)
    assert serve_current_version(root, None) == VERSIONS[1]
    retriever = Retriever.load(root)
    assert retriever.manifest["version"] == VERSIONS[1] and retriever.shards["images"][0].row_meta(0)["id"].startswith("img-1-")
    assert cli_main(["index", "rollback", "v20251231T000000Z-dead00", root]) == 4  # not published
    assert mf.current_version(root) == VERSIONS[1]

    assert cli_main(["index", "gc", "--keep", "1", "--dry-run", root]) == 0
    assert len(ver.list_versions(root)) == 6
    capsys.readouterr()
    assert cli_main(["index", "gc", "--keep", "1", root]) == 0
    left = {v.version: v for v in ver.list_versions(root)}
    # kept: the newest published, the current one (rolled back to), the one being built
    assert set(left) == {VERSIONS[-1], VERSIONS[1], "v20260201T000000Z-0b0110"}
    assert Retriever.load(root).manifest["version"] == VERSIONS[1]
    assert cli_main(["index", "list", "--json", root]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [v["version"] for v in listed if v["current"]] == [VERSIONS[1]]
    with pytest.raises(ValueError, match="keep"):
        ver.gc(root, 0)


def test_lifecycle_on_a_local_root(tmp_path, capsys):
    _check_lifecycle(str(tmp_path / "index"), capsys)


@pytest.mark.slow
def test_lifecycle_on_s3(s3_server, capsys):
    _check_lifecycle(s3_server.uri("indexes", "lifecycle"), capsys)


def test_missing_root_is_a_storage_error(tmp_path, capsys):
    assert cli_main(["index", "list", str(tmp_path / "nope")]) == 4
    err = capsys.readouterr().err
    assert "no index root" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
