"""Index lifecycle: list, rollback, gc on a local root and on S3, through the library and the CLI."""

import json

import numpy as np
import pytest

from pipelines.cli import main as cli_main
from sdray import storage
from sdray.index import IndexConfig, Retriever, ShardData, build_index
from sdray.index import manifest as mf
from sdray.index import leases as ls
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

    assert cli_main(["index", "gc", "--keep", "1", "--dry-run", "--set", "min_age_s=0", root]) == 0
    assert len(ver.list_versions(root)) == 6
    # the default grace (min_age_s) keeps the versions just published; the abandoned partial one
    # (named 2025-12-31) is old enough to go
    capsys.readouterr()
    assert cli_main(["index", "gc", "--keep", "1", root]) == 0
    out = capsys.readouterr().out
    assert "deleted 1 version(s)" in out and f"kept {VERSIONS[0]}: " in out and "younger than min_age_s" in out
    assert len(ver.list_versions(root)) == 5
    assert cli_main(["index", "gc", "--keep", "1", "--set", "min_age_s=0", root]) == 0
    left = {v.version: v for v in ver.list_versions(root)}
    # kept: the newest published, the current one (rolled back to), the one being built
    assert set(left) == {VERSIONS[-1], VERSIONS[1], "v20260201T000000Z-0b0110"}
    assert Retriever.load(root).manifest["version"] == VERSIONS[1]
    assert cli_main(["index", "list", "--json", root]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [v["version"] for v in listed if v["current"]] == [VERSIONS[1]]
    with pytest.raises(ValueError, match="keep"):
        ver.gc(root, 0)
    assert cli_main(["index", "gc", "--keep", "1", "--set", "ttl_s=10", "--set", "renew_s=20", root]) == 3


def test_lifecycle_on_a_local_root(tmp_path, capsys):
    _check_lifecycle(str(tmp_path / "index"), capsys)


@pytest.mark.slow
def test_lifecycle_on_s3(s3_server, capsys):
    _check_lifecycle(s3_server.uri("indexes", "lifecycle"), capsys)


def test_missing_root_is_a_storage_error(tmp_path, capsys):
    assert cli_main(["index", "list", str(tmp_path / "nope")]) == 4
    err = capsys.readouterr().err
    assert "no index root" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- leases vs gc

def _check_leases(root: str) -> None:
    """gc keeps a version a reader leases while the lease is fresh, deletes it once expired."""
    for seed, version in enumerate(VERSIONS[:3]):
        build_index(root, _data(seed), n_shards=2, config=IndexConfig(), version=version)
    cfg = ls.LeaseConfig(ttl_s=120, renew_s=30, clock_skew_s=5, min_age_s=0)
    t0 = 1_900_000_000.0
    ls.write_lease(root, VERSIONS[0], "app-group0-replica/a", ttl_s=120, now=t0)
    held = ls.read_leases(root)
    assert list(held) == [VERSIONS[0]] and held[VERSIONS[0]][0].holder == "app-group0-replica/a"

    result = ver.gc(root, 1, config=cfg, now=t0 + 100)            # fresh: kept; v2 unleased: deleted
    assert result.deleted == [VERSIONS[1]] and list(result.kept) == [VERSIONS[0]]
    assert "leased by 1 reader(s): app-group0-replica/a" in result.kept[VERSIONS[0]]
    assert Retriever.load(storage.join(root, VERSIONS[0])).manifest["version"] == VERSIONS[0]
    # within the clock-skew margin past the TTL still fresh; past it, expired
    assert ver.gc(root, 1, config=cfg, now=t0 + 124).kept == result.kept
    assert ver.gc(root, 1, config=cfg, dry_run=True, now=t0 + 126).deleted == [VERSIONS[0]]
    # an unreadable lease (torn or foreign) keeps the version: gc deletes nothing on doubt
    storage.write_bytes(ls.lease_uri(root, VERSIONS[0], "garbled"), b"{not json")
    assert VERSIONS[0] in ver.gc(root, 1, config=cfg, now=t0 + 10_000).kept
    storage.write_bytes(ls.lease_uri(root, VERSIONS[0], "garbled"), b"")
    ls.release_lease(root, VERSIONS[0], "garbled")
    result = ver.gc(root, 1, config=cfg, now=t0 + 126)
    assert result.deleted == [VERSIONS[0]] and not result.kept
    assert [v.version for v in ver.list_versions(root)] == [VERSIONS[2]]
    assert ls.read_leases(root) == {}                               # its expired lease went with it
    # a young version is kept by the grace period, whoever leases it
    build_index(root, _data(7), n_shards=1, config=IndexConfig(), version=VERSIONS[3])
    kept = ver.gc(root, 1, config=cfg.model_copy(update={"min_age_s": 3600})).kept
    assert list(kept) == [VERSIONS[2]] and "younger than min_age_s" in kept[VERSIONS[2]]


def test_gc_honours_fresh_leases_on_a_local_root(tmp_path):
    _check_leases(str(tmp_path / "index"))


@pytest.mark.slow
def test_gc_honours_fresh_leases_on_s3(s3_server):
    _check_leases(s3_server.uri("indexes", "leases"))


def test_lease_holder_writes_renews_and_releases(tmp_path):
    root = str(tmp_path / "index")
    holder = ls.LeaseHolder(root, "r1", ls.LeaseConfig(ttl_s=60, renew_s=30))
    holder.hold("v20260101T000000Z-000001")
    first = ls.read_leases(root)["v20260101T000000Z-000001"][0]
    assert first.fresh(first.renewed_at + 60, 0) and not first.fresh(first.renewed_at + 61, 0)
    assert holder.renew() == []                                     # not due yet
    assert holder.renew(force=True) == ["v20260101T000000Z-000001"]
    assert ls.read_leases(root)["v20260101T000000Z-000001"][0].renewed_at >= first.renewed_at
    holder.release("v20260101T000000Z-000001")
    assert ls.read_leases(root) == {} and holder.versions() == []
    with pytest.raises(ValueError, match="renew_s"):
        ls.LeaseConfig(ttl_s=10, renew_s=10)


def test_gc_keeps_what_a_shard_searcher_replica_holds(tmp_path):
    """A real ShardSearcher replica (its class, no Serve): it leases the served version; after a
    publish, gc keeps that version until the replica drops it."""
    from serve.searchers import ShardSearcher

    root = str(tmp_path / "index")
    build_index(root, _data(0), n_shards=2, config=IndexConfig(), version=VERSIONS[0])
    replica = ShardSearcher.func_or_class(root, 0, 1, 0, leases={"ttl_s": 60, "renew_s": 20})
    try:
        assert [x.holder for x in ls.read_leases(root)[VERSIONS[0]]] == [f"sdray-group0-{replica.replica}"]
        build_index(root, _data(1), n_shards=2, config=IndexConfig(), version=VERSIONS[1])  # publish
        cfg = ls.LeaseConfig(min_age_s=0)
        assert cli_main(["index", "gc", "--keep", "1", "--set", "min_age_s=0", root]) == 0
        assert ver.gc(root, 1, config=cfg).kept.keys() == {VERSIONS[0]}
        replica.group.load(VERSIONS[1])
        replica.group.protected = {VERSIONS[1]}
        replica.group.keep_only({VERSIONS[1]})                         # the swap finished
        assert set(ls.read_leases(root)) == {VERSIONS[1]}
        assert ver.gc(root, 1, config=cfg).deleted == [VERSIONS[0]]
        replica.check_health()
        assert replica.group.find(VERSIONS[1], "images", "img-1-0")["id"] == "img-1-0"
        replica.__del__()                                              # a replica shutting down
        assert ls.read_leases(root) == {}
    finally:
        replica._stop.set()
