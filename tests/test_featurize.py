"""``sdray featurize`` end to end on a shared local Ray: generated, corrupt, img2dataset and
Parquet shards, locally and through a real S3 server (SeaweedFS)."""

from __future__ import annotations

import argparse
import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from sdray import storage
from sdray.config import BackboneConfig
from tests import data_fixtures as F

pytestmark = pytest.mark.slow
BACKBONE = BackboneConfig(image_size=64)


def _write_mixed(root: str) -> tuple[dict[str, int], set[str], int]:
    """Corrupt and foreign shards under ``root``; returns (skip counts, valid ids, n valid)."""
    from pipelines.synth import synth

    meta = synth(storage.join(root, "gen"), n=24, n_val=0, n_test=0, image_size=48,
                 shard_size=12, splits=("train",), progress=False)
    valid = set()
    for uri in meta["splits"]["train"]["shards"]:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri))) as tf:
            valid |= {f"gen/train/{uri.rsplit('/', 1)[1][:-4]}/{m.name.split('.')[0]}" for m in tf}
    _, expected, good = F.mixed_samples()
    storage.write_bytes(storage.join(root, "bad", "mixed.tar"), F.mixed_tar())
    valid |= {f"bad/mixed/{k}" for k in good}
    storage.write_bytes(storage.join(root, "bad", "unreadable.tar"), b"\x00garbage" * 300)
    whole = F.img2dataset_tar(6, start=100)
    cut = tarfile.open(fileobj=io.BytesIO(whole)).getmembers()[10].offset_data + 5
    storage.write_bytes(storage.join(root, "bad", "cut.tar"), whole[:cut])
    valid |= {f"bad/cut/{i:09d}" for i in range(100, 103)}
    storage.write_bytes(storage.join(root, "web", "00000.tar"), F.img2dataset_tar(4))
    valid |= {f"web/00000/{i:09d}" for i in range(4)}
    pq_bytes, pq_expected, pq_good = F.mixed_parquet()
    storage.write_bytes(storage.join(root, "pq", "part-0.parquet"), pq_bytes)
    valid |= {f"pq/part-0/{k}" for k in pq_good}
    counts = dict(expected)
    for k, v in pq_expected.items():
        counts[k] = counts.get(k, 0) + v
    counts["shard_unreadable"] = 1
    counts["shard_truncated"] = 1
    return dict(sorted(counts.items())), valid, len(valid)


def _check_output(out: str, manifest: dict, valid: set[str]) -> None:
    assert manifest["text_dim"] == 384 and manifest["image_dim"] == 1280
    assert manifest["backbone"]["image_size"] == 64
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(f))) for f in manifest["files"]]
    ids = [s for t in tables for s in t.column("sample_id").to_pylist()]
    assert len(ids) == len(set(ids)) and set(ids) == valid
    t = tables[0]
    import pyarrow as pa

    ty = {f.name: f.type for f in t.schema}
    assert pa.types.is_list(ty["input_ids"]) and ty["input_ids"].value_type == pa.int32()
    assert pa.types.is_fixed_size_list(ty["text_features"]) and ty["text_features"].list_size == 384
    assert ty["text_features"].value_type == pa.float32()
    assert pa.types.is_fixed_size_list(ty["image_features"]) and ty["image_features"].list_size == 1280
    toks = t.column("input_ids").to_pylist()[0]
    assert toks[0] == 101 and toks[-1] == 102                      # [CLS] ... [SEP], unpadded
    feats = np.stack(t.column("image_features").to_numpy(zero_copy_only=False))
    assert np.isfinite(feats).all() and feats.std() > 0


def test_featurize_local_counts_skips_and_resumes(ray_session, tmp_path):
    from pipelines.featurize import featurize

    root, out = str(tmp_path / "data"), str(tmp_path / "feat")
    counts, valid, n = _write_mixed(root)
    m = featurize(root, out, BACKBONE, batch_size=16, progress=False)
    assert m["skips"] == counts
    assert m["n_samples"] == n and m["shards_total"] == 7 and len(m["shards_done"]) == 7
    assert storage.read_json(storage.join(out, "manifest.json"))["skips"] == counts
    _check_output(out, m, valid)
    assert storage.exists(storage.join(out, "gen", "train", "shard-00000.parquet"))
    # one small record per finished shard, written beside the outputs
    assert len(storage.list_files(storage.join(out, "_shards"), (".json",))) == 7
    web = pq.read_table(storage.join(out, "web", "00000.parquet"))
    assert web.column("url").to_pylist() == [f"http://example.com/{i}.jpg" for i in range(4)]
    from sdray.data.formats import iter_shard_samples
    from sdray.data.skips import SkipCounts
    from serve.images import read_image_bytes      # each row knows where its image sits in the tar

    tar = storage.join(root, "web", "00000.tar")
    images = {s["key"]: s["image"] for s in iter_shard_samples(
        io.BytesIO(storage.read_bytes(tar)), tar, SkipCounts())}
    for key, loc in zip(web.column("key").to_pylist(), web.column("image_loc").to_pylist()):
        assert loc.startswith("bytes=") and read_image_bytes(f"{tar}#{key}", loc) == images[key]
    # re-run: nothing to do
    m2 = featurize(root, out, BACKBONE, progress=False)
    assert m2["last_run"]["shards"] == 0 and m2["n_samples"] == n and m2["skips"] == counts
    # a lost output file is redone, alone
    lost = storage.join(out, "web", "00000.parquet")
    storage.filesystem(lost)[0].rm(storage.filesystem(lost)[1])
    m3 = featurize(root, out, BACKBONE, progress=False)
    assert m3["last_run"]["shards"] == 1 and m3["n_samples"] == n and m3["skips"] == counts
    _check_output(out, m3, valid)

    from pipelines.datasets import read_features

    assert read_features(out).count() == n
    # non-empty input of which nothing is kept: an error, not an empty success
    junk = str(tmp_path / "junk")
    storage.write_bytes(storage.join(junk, "a.tar"), b"\x00garbage" * 300)
    storage.write_bytes(storage.join(junk, "b.parquet"), b"not parquet")
    with pytest.raises(ValueError, match="no sample kept from the 2 shards"):
        featurize(junk, str(tmp_path / "none"), BACKBONE, progress=False)
    assert not storage.exists(str(tmp_path / "none" / "manifest.json"))


def test_synth_then_featurize_through_s3(ray_session, s3_server, tmp_path, capsys):
    from pipelines import featurize as fjob
    from pipelines import synth as sjob

    data, out = s3_server.uri("e2e", "data"), s3_server.uri("e2e", "feat")
    p = argparse.ArgumentParser()
    sjob.add_arguments(p)
    assert sjob.main(p.parse_args(["--out", data, "--n", "16", "--n-val", "4", "--n-test", "4",
                                   "--image-size", "48", "--shard-size", "8"])) == 0
    storage.write_bytes(storage.join(data, "bad", "mixed.tar"), F.mixed_tar())
    p = argparse.ArgumentParser()
    fjob.add_arguments(p)
    rc = fjob.main(p.parse_args(["--data", data, "--out", out, "--image-size", "64",
                                 "--batch-size", "16", "--json"]))
    assert rc == 0
    import json

    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _, expected, good = F.mixed_samples()
    assert line["skips"] == dict(sorted(expected.items()))
    assert line["n_samples"] == 16 + 8 + 8 + len(good)
    m = storage.read_json(storage.join(out, "manifest.json"))
    assert all(f.startswith("s3://") for f in m["files"])
    assert storage.list_files(storage.join(out, "val"), (".parquet",))

    from pipelines.datasets import read_features

    assert read_features(storage.join(out, "train")).count() == 16


def test_wrong_credentials_give_a_clear_error(s3_server, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
    uri = s3_server.uri("nope")
    with pytest.raises(storage.StorageError, match="credentials"):
        storage.check_access(uri)
    from pipelines.cli import EXIT_STORAGE, main as cli_main

    assert cli_main(["synth", "--out", uri, "--n", "2"]) == EXIT_STORAGE  # one line, no traceback
    assert cli_main(["featurize", "--data", uri, "--out", str(tmp_path / "o")]) == EXIT_STORAGE
    err = capsys.readouterr().err
    assert uri in err and "credentials" in err and "AWS_SECRET_ACCESS_KEY" in err
